"""The HTTP/1.1 upstream client against scripted servers on 127.0.0.1 (real sockets).

Every scenario runs on asyncio's loop and on uvloop (which the gateway uses), each in a
fresh loop bounded in time; a transport left open fails the test (filterwarnings=error).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from fleetserve.config import TimeoutSettings
from fleetserve.errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.testing.gateway import wait_until
from fleetserve.transport.http1 import Http1Client
from fleetserve.transport.http1_connection import PAUSE_AT_BYTES, Connection

Run = Callable[[Coroutine[Any, Any, None]], None]
SCENARIO_LIMIT_S = 10.0


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run_scenario(scenario: Coroutine[Any, Any, None]) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(SCENARIO_LIMIT_S):
                await scenario

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bounded())

    return run_scenario


# A scripted server ---------------------------------------------------------------------------


@dataclass
class Request:
    index: int  # across all connections, from 0
    head: bytes
    body: bytes


@dataclass
class Peer:
    """One connection as the server saw it."""

    requests: list[Request] = field(default_factory=list)
    eof: asyncio.Event = field(default_factory=asyncio.Event)


# Answers one request; returns False to close the connection afterwards.
Answer = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class ScriptedServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.peers: list[Peer] = []
        self._count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def requests(self) -> list[Request]:
        return [r for p in self.peers for r in p.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        peer = Peer()
        self.peers.append(peer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = Request(self._count, head, await reader.readexactly(length))
                self._count += 1
                peer.requests.append(request)
                if not await self.answer(request, reader, writer):
                    break
        finally:
            peer.eof.set()
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def reply(body: bytes = b'{"ok":true}', status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def chunked(*parts: bytes, end: bool = True) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return head + body + (b"0\r\n\r\n" if end else b"")


async def dribble(writer: asyncio.StreamWriter, data: bytes, cuts: list[int]) -> None:
    """Write `data` in pieces cut at `cuts`, with gaps, so that they arrive as separate reads."""
    start = 0
    for cut in [*cuts, len(data)]:
        writer.write(data[start:cut])
        await writer.drain()
        await asyncio.sleep(0.005)
        start = cut


def answer_with(data: bytes, *, keep: bool = True) -> Answer:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(data)
        await w.drain()
        return keep

    return answer


async def until_eof(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """Never answer; return when the client closes the connection."""
    await reader.read()
    return False


@contextlib.asynccontextmanager
async def client(**kwargs: Any) -> AsyncIterator[Http1Client]:
    http = Http1Client(kwargs.pop("connect_timeout_s", 2.0), **kwargs)
    try:
        yield http
    finally:
        await http.close()


async def post(http: Http1Client, url: str, first_byte_s: float = 2.0) -> tuple[int, bytes]:
    response = await http.request(url, b'{"q":1}', "rid-1", first_byte_s, stream=False)
    body = response.body()
    response.finish()
    return response.status, body


async def read_stream(http: Http1Client, url: str) -> list[bytes]:
    response = await http.request(url, b"{}", "rid-s", 2.0, stream=True)
    try:
        chunks = []
        while chunk := await response.next_chunk(2.0, "idle"):
            chunks.append(chunk)
    except BaseException:
        response.abort()
        raise
    response.finish()
    return chunks


def origin(server: ScriptedServer) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


# Keep-alive and framing ----------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(run: Run) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(reply())) as server, client() as http:
            for _ in range(5):
                assert await post(http, server.url) == (200, b'{"ok":true}')
            assert len(server.peers) == 1
            assert len(server.requests) == 5
            assert http.idle_count(origin(server)) == 1
            head = server.requests[0].head
            assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
            for line in (
                b"Host: 127.0.0.1:%d" % server.port,
                b"Content-Type: application/json",
                b"Content-Length: 7",
                b"X-Request-Id: rid-1",
                b"Connection: keep-alive",
            ):
                assert line in head.split(b"\r\n")  # fmt: skip
            assert server.requests[0].body == b'{"q":1}'

    run(scenario())


@pytest.mark.parametrize(
    ("data", "cuts", "body"),
    [
        pytest.param(reply(b"0123456789"), [3, 20, 50, 55], b"0123456789", id="length-cut-in-head"),
        pytest.param(reply(b"0123456789"), [62, 63, 64], b"0123456789", id="length-cut-in-body"),
        pytest.param(chunked(b"abc", b"defgh"), [80, 81, 83, 87, 90], b"abcdefgh",
                     id="chunked-cut-in-sizes"),
        pytest.param(chunked(b"x" * 300), [88, 200, 380], b"x" * 300, id="chunked-one-big"),
    ],
)  # fmt: skip
def test_bodies_split_at_odd_boundaries(
    run: Run, data: bytes, cuts: list[int], body: bytes
) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await dribble(w, data, cuts)
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            assert await post(http, server.url) == (200, body)
            assert b"".join(await read_stream(http, server.url)) == body
            assert len(server.peers) == 1  # both ended cleanly, so the connection was reused

    run(scenario())


def test_stream_chunks_arrive_as_they_are_sent(run: Run) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        data = chunked(b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n")
        head_end = data.index(b"\r\n\r\n") + 4
        await dribble(w, data, [head_end + 14, head_end + 28, head_end + 42])
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            chunks = await read_stream(http, server.url)
            assert chunks == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]

    run(scenario())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(reply(extra=b"Connection: close\r\n"), id="connection-close"),
        pytest.param(b'HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}', id="http-1.0"),
    ],
)
def test_connection_close_is_not_reused(run: Run, data: bytes) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(data)) as server, client() as http:
            assert await post(http, server.url) == (200, b'{"ok":true}')
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)  # the client closed it
            assert http.idle_count(origin(server)) == 0
            assert await post(http, server.url) == (200, b'{"ok":true}')
            assert len(server.peers) == 2

    run(scenario())


def test_body_delimited_by_eof(run: Run) -> None:
    data = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello"

    async def scenario() -> None:
        async with ScriptedServer(answer_with(data, keep=False)) as server, client() as http:
            assert await post(http, server.url) == (200, b"hello")
            assert http.idle_count(origin(server)) == 0

    run(scenario())


# Stale pooled connections --------------------------------------------------------------------


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(run: Run) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.index == 1:  # the replica closed the idle connection as the request came
            return False
        w.write(reply())
        await w.drain()
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            assert await post(http, server.url) == (200, b'{"ok":true}')
            assert await post(http, server.url) == (200, b'{"ok":true}')
            assert [len(p.requests) for p in server.peers] == [2, 1]

    run(scenario())


def test_connection_closed_while_idle_is_not_used(run: Run) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(reply(), keep=False)) as server, client() as http:
            assert await post(http, server.url) == (200, b'{"ok":true}')
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)
            await asyncio.sleep(0.05)  # the client sees the close
            assert http.idle_count(origin(server)) == 0
            assert await post(http, server.url) == (200, b'{"ok":true}')

    run(scenario())


def test_fresh_connection_closed_before_answer_is_an_error(run: Run) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(b"", keep=False)) as server, client() as http:
            with pytest.raises(UpstreamConnectError, match="before answering"):
                await post(http, server.url)
            assert len(server.peers) == 1  # not retried

    run(scenario())


def test_stale_retry_happens_only_once(run: Run) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.index:
            return False
        w.write(reply())
        await w.drain()
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            await post(http, server.url)
            with pytest.raises(UpstreamConnectError):
                await post(http, server.url)
            assert len(server.peers) == 2

    run(scenario())


# Connect and timeouts ------------------------------------------------------------------------


def test_refused_connection(run: Run) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    async def scenario() -> None:
        async with client() as http:
            with pytest.raises(UpstreamConnectError, match="cannot connect"):
                await post(http, f"http://127.0.0.1:{port}/x")

    run(scenario())


@contextlib.contextmanager
def unaccepted_listener() -> Iterator[int]:
    """A port whose accept queue is full, so a connect to it hangs (Linux drops the SYN)."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("could not fill the accept queue")
        yield port


def test_connect_timeout(run: Run) -> None:
    with unaccepted_listener() as port:

        async def scenario() -> None:
            async with client(connect_timeout_s=0.2) as http:
                with pytest.raises(UpstreamTimeoutError) as info:
                    await post(http, f"http://127.0.0.1:{port}/x")
                assert info.value.phase == "connect"

        run(scenario())


def test_first_byte_timeout_closes_the_connection(run: Run) -> None:
    async def scenario() -> None:
        async with ScriptedServer(until_eof) as server, client() as http:
            with pytest.raises(UpstreamTimeoutError) as info:
                await post(http, server.url, first_byte_s=0.1)
            assert info.value.phase == "first_byte"
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)

    run(scenario())


def test_idle_timeout_mid_stream(run: Run) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(chunked(b"data: 1\n\n", end=False))
        await reader.read()
        return False

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            response = await http.request(server.url, b"{}", "r", 2.0, stream=True)
            assert await response.next_chunk(0.1, "idle") == b"data: 1\n\n"
            with pytest.raises(UpstreamTimeoutError) as info:
                await response.next_chunk(0.1, "idle")
            assert info.value.phase == "idle"
            response.abort()
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)

    run(scenario())


def test_server_dies_mid_stream(run: Run) -> None:
    async def scenario() -> None:
        data = chunked(b"data: 1\n\n", end=False)
        async with ScriptedServer(answer_with(data, keep=False)) as server, client() as http:
            with pytest.raises(UpstreamClosedError, match="mid-response"):
                await read_stream(http, server.url)
            assert http.idle_count(origin(server)) == 0

    run(scenario())


# Cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "buffered"])
def test_cancelled_request_closes_its_connection(run: Run, stream: bool) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.index == 0:
            w.write(chunked(b"data: 1\n\n", end=False) if stream else reply()[:-3])
            await reader.read()  # until the client closes
            return False
        w.write(reply())
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            started = asyncio.Event()

            async def consume() -> None:
                response = await http.request(server.url, b"{}", "r", 5.0, stream=stream)
                try:
                    started.set()
                    while await response.next_chunk(5.0, "idle"):
                        pass
                except BaseException:
                    response.abort()
                    raise

            task = asyncio.create_task(consume())
            if stream:
                await asyncio.wait_for(started.wait(), 2)
            else:
                await wait_until(lambda: bool(server.requests))
                await asyncio.sleep(0.05)  # the partial answer has arrived
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)  # the replica sees EOF
            assert http.idle_count(origin(server)) == 0
            assert await post(http, server.url) == (200, b'{"ok":true}')
            assert len(server.peers) == 2

    run(scenario())


# Malformed answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "cuts"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", [1000, 30_000],
                     id="one-huge-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\n"
                     + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 90) for i in range(800)) + b"\r\n",
                     [], id="many-headers"),
    ],
)  # fmt: skip
def test_oversize_head_is_an_error(run: Run, data: bytes, cuts: list[int]) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        with contextlib.suppress(ConnectionError):
            await dribble(w, data, cuts)
        await reader.read()
        return False

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client() as http:
            with pytest.raises(UpstreamClosedError, match="head"):
                await post(http, server.url)
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)

    run(scenario())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"HTTP/1.1 abc OK\r\n\r\n", id="bad-status"),
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", id="bad-length"),
        pytest.param(chunked(end=False) + b"zz\r\n", id="bad-chunk-size"),
    ],
)
def test_malformed_answer_is_an_error(run: Run, data: bytes) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(data)) as server, client() as http:
            with pytest.raises(UpstreamClosedError, match="malformed response"):
                await post(http, server.url)
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)

    run(scenario())


def test_buffered_body_over_the_limit(run: Run) -> None:
    async def scenario() -> None:
        big = reply(b"x" * 5000)
        async with ScriptedServer(answer_with(big)) as server, client(max_body_bytes=1000) as http:
            with pytest.raises(UpstreamClosedError, match="over 1000 B"):
                await post(http, server.url)

    run(scenario())


# Pool bounds and close -----------------------------------------------------------------------


def test_idle_connections_expire(run: Run) -> None:
    async def scenario() -> None:
        async with (
            ScriptedServer(answer_with(reply())) as server,
            client(idle_expiry_s=0.05) as http,
        ):
            await post(http, server.url)
            await asyncio.sleep(0.1)
            await post(http, server.url)
            assert len(server.peers) == 2
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)

    run(scenario())


def test_idle_connections_per_origin_are_bounded(run: Run) -> None:
    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)  # so that the three requests overlap
        w.write(reply())
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server, client(max_idle_per_origin=1) as http:
            await asyncio.gather(*(post(http, server.url) for _ in range(3)))
            assert len(server.peers) == 3
            assert http.idle_count(origin(server)) == 1
            await wait_until(lambda: sum(p.eof.is_set() for p in server.peers) == 2)

    run(scenario())


def test_close_closes_pooled_connections(run: Run) -> None:
    async def scenario() -> None:
        async with ScriptedServer(answer_with(reply())) as server:
            http = Http1Client(2.0)
            await post(http, server.url)
            await http.close()
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)
            with pytest.raises(UpstreamConnectError, match="closed"):
                await post(http, server.url)

    run(scenario())


def test_forget_drops_the_pools_and_heads_of_replicas_that_left(run: Run) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(client())
            for _ in range(20):  # replicas come and go, each on a new port
                server = await stack.enter_async_context(ScriptedServer(answer_with(reply())))
                await post(http, server.url)
                assert origin(server) in http.origins()
                http.forget(server.url)
                assert http.origins() == set()
                await asyncio.wait_for(server.peers[0].eof.wait(), 2)  # its idle one closed
            assert http.origins() == set()

    run(scenario())


def test_forget_does_not_pool_a_connection_in_use_again(run: Run) -> None:
    async def scenario() -> None:
        async with (
            ScriptedServer(answer_with(chunked(b"a", b"b"))) as server,
            client() as http,
        ):
            response = await http.request(server.url, b"{}", "rid-s", 2.0, stream=True)
            http.forget(origin(server))  # the replica left while this request was served
            while await response.next_chunk(2.0, "idle"):
                pass
            response.finish()
            assert http.origins() == set()
            assert http.idle_count(origin(server)) == 0
            await asyncio.wait_for(server.peers[0].eof.wait(), 2)
            assert await post(http, server.url) == (200, b"ab")  # afresh, should it come back
            assert http.idle_count(origin(server)) == 1

    run(scenario())


def test_pools_of_replicas_gone_without_forget_are_dropped(run: Run) -> None:
    async def scenario() -> None:
        async with client() as http:
            for _ in range(150):
                # The replica closes after answering, as one that went away would.
                async with ScriptedServer(answer_with(reply(), keep=False)) as server:
                    await post(http, server.url)
                await wait_until(lambda: http.idle_count(origin(server)) == 0)  # seen closed
            # At most twice the live pools (none) past the threshold where they are swept.
            assert len(http._idle) <= 64

    run(scenario())


# Back-pressure (the protocol object, with a recording transport) ----------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading: list[str] = []  # "pause" and "resume", in order
        self.written = b""
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True


def test_stream_reading_pauses_when_the_reader_falls_behind() -> None:
    async def scenario() -> None:
        conn = Connection(asyncio.get_running_loop(), lambda c: None)
        transport = RecordingTransport()
        conn.connection_made(transport)
        conn.begin(b"POST / HTTP/1.1\r\n\r\n", body_limit=0)
        size = 2 * PAUSE_AT_BYTES
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"y" * (PAUSE_AT_BYTES // 4)
        for _ in range(4):
            conn.data_received(piece)
        assert transport.reading == []  # at the mark, not over it
        conn.data_received(piece)
        assert transport.reading == ["pause"]
        assert len(conn.take()) == 5 * len(piece)
        assert transport.reading == ["pause", "resume"]
        for _ in range(3):
            conn.data_received(piece)
        assert conn.complete
        assert transport.reading == ["pause", "resume"]
        assert not transport.aborted

    asyncio.run(scenario())


# Through UpstreamClient (what proxy.py uses) -------------------------------------------------


def test_error_status_of_a_stream_is_read_and_the_connection_kept(run: Run) -> None:
    answer = answer_with(reply(b'{"error":"busy"}', status="503 Service Unavailable"))

    async def scenario() -> None:
        async with ScriptedServer(answer) as server:
            upstream = UpstreamClient(TimeoutSettings(first_byte_s=2, idle_s=2))
            try:
                for _ in range(2):
                    with pytest.raises(UpstreamStatusError) as info:
                        async with upstream.stream(server.url, b"{}", "r"):
                            pass
                    assert info.value.status == 503
                    assert info.value.body == b'{"error":"busy"}'
                    assert info.value.content_type == "application/json"
                with pytest.raises(UpstreamStatusError):
                    await upstream.send(server.url, b"{}", "r")
                assert len(server.peers) == 1
            finally:
                await upstream.close()

    run(scenario())


def test_stream_through_upstream_client(run: Run) -> None:
    data = chunked(b"data: 1\n\n", b"data: [DONE]\n\n")

    async def scenario() -> None:
        async with ScriptedServer(answer_with(data)) as server:
            upstream = UpstreamClient(TimeoutSettings(first_byte_s=2, idle_s=2))
            try:
                for _ in range(2):
                    async with upstream.stream(server.url, b"{}", "r") as stream:
                        assert stream.status == 200
                        assert stream.content_type == "text/event-stream"
                        got = [await stream.next_chunk(timeout_s=1.0)]
                        while chunk := await stream.next_chunk():
                            got.append(chunk)
                    assert b"".join(got) == b"data: 1\n\ndata: [DONE]\n\n"
                assert len(server.peers) == 1
            finally:
                await upstream.close()

    run(scenario())


def test_https_replicas_go_through_aiohttp(run: Run) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> None:
        upstream = UpstreamClient(TimeoutSettings(connect_s=1, first_byte_s=2, idle_s=2))
        try:
            with pytest.raises(UpstreamConnectError, match="cannot connect"):
                await upstream.send(f"https://127.0.0.1:{port}/v1/completions", b"{}", "r")
            with pytest.raises(UpstreamConnectError, match="cannot connect"):
                async with upstream.stream(f"https://127.0.0.1:{port}/v1/completions", b"{}", "r"):
                    pass
            assert upstream.http1.idle_count(("127.0.0.1", port)) == 0
        finally:
            await upstream.close()

    run(scenario())


def test_bench_options_extra_headers_read_stamps_and_captured_headers(run: Run) -> None:
    """Bench's options: headers on every request, each read timed, chosen headers kept."""
    stamps = iter([10.0, 20.0, 30.0, 40.0, 50.0])
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"X-Fleetserve-Replica: r-2\r\nX-Other: no\r\n\r\n"
    )

    async def answer(req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(head)
        await w.drain()
        await asyncio.sleep(0.01)
        await dribble(w, b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", [10])
        return True

    async def scenario() -> None:
        async with (
            ScriptedServer(answer) as server,
            client(
                headers={"Authorization": "Bearer k"},
                stamp=lambda: next(stamps),
                capture_headers=("x-fleetserve-replica",),
            ) as http,
        ):
            response = await http.request(server.url, b"{}", "rid", 2.0, stream=True)
            assert response.headers == {"x-fleetserve-replica": "r-2"}
            parts: list[tuple[bytes, float]] = []
            while True:
                chunks, times = await response.next_parts(2.0, "idle")
                if not chunks:
                    break
                parts += zip(chunks, times, strict=True)
            response.finish()
            assert b"".join(c for c, _ in parts) == b"helloworld"
            assert [t for _, t in parts] == sorted(t for _, t in parts)  # one stamp per read
            assert parts[0] == (b"hello", 20.0)  # the head came in the first read (10.0)
            assert (
                b"\r\nAuthorization: Bearer k\r\nX-Request-Id: rid\r\n" in server.requests[0].head
            )

    run(scenario())


@pytest.mark.parametrize("header", [{"Bad\r\nName": "x"}, {"A": "b\r\nInjected: 1"}, {"": "x"}])
def test_request_headers_cannot_inject_lines(header: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="invalid request header"):
        Http1Client(1.0, headers=header)
