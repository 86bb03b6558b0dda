"""A TCP proxy on loopback that a test can cut: a database (or any server) made unreachable on
demand, without touching the server itself.

    proxy = TcpProxy("127.0.0.1", 5432)
    port = await proxy.start()        # point the client at 127.0.0.1:port
    await proxy.pause()               # connections reset, new ones refused: "unreachable"
    await proxy.pause(hang=True)      # or: nothing answers any more (a network partition)
    await proxy.resume()
    await proxy.stop()

`pause()` resets every open connection and, while paused, resets each new one as soon as it
is accepted (the listening port is kept, so nobody else can take it meanwhile). With
`hang=True` open connections stay open but their bytes are dropped, and new ones are accepted
and never answered, so clients wait until their own timeouts; `resume()` then resets the hung
connections (their streams have lost bytes) and forwards again. For the ledger's durability
test and benchmark (issue 10, must-show 4).
"""

from __future__ import annotations

import asyncio
import contextlib

from fleetserve.fleet.processes import LOOPBACK

CHUNK_BYTES = 64 * 1024
STOP_TIMEOUT_S = 5.0


class _Pipe:
    """One client connection and its upstream one."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.frozen = False  # paused with hang=True: read and drop, forward nothing

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = LOOPBACK) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.accepted = 0  # connections accepted, in any state
        self._server: asyncio.Server | None = None
        self._port = 0
        self._paused = False
        self._hang = False
        self._pipes: set[_Pipe] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def connections(self) -> int:
        """Client connections open now (forwarding or hung)."""
        return len(self._pipes)

    async def start(self) -> int:
        """Listen on a free port of `host`; the port."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self._port

    async def pause(self, *, hang: bool = False) -> None:
        self._paused = True
        self._hang = hang
        for pipe in list(self._pipes):
            if hang:
                pipe.frozen = True
            else:
                pipe.reset()
        await asyncio.sleep(0)  # let the handlers see their connections end

    async def resume(self) -> None:
        self._paused = False
        self._hang = False
        for pipe in list(self._pipes):
            if pipe.frozen:
                pipe.reset()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for pipe in list(self._pipes):
            pipe.reset()
        # Reset connections end their handlers; cancelling one instead makes Python 3.11's
        # StreamReaderProtocol log a spurious error. Cancel only what outlives the reset.
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            await self._serve(pipe, reader)
        finally:
            pipe.reset()
            self._pipes.discard(pipe)
            self._handlers.discard(task)

    async def _serve(self, pipe: _Pipe, reader: asyncio.StreamReader) -> None:
        if self._paused and not self._hang:
            return  # reset at once: the server is "unreachable"
        if self._paused:
            pipe.frozen = True
            await _drain_into_nothing(reader)
            return
        try:
            up_reader, pipe.upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            return
        if self._cut():  # paused while it connected
            if not self._hang:
                return
            pipe.frozen = True
        await asyncio.gather(
            self._copy(pipe, reader, pipe.upstream),
            self._copy(pipe, up_reader, pipe.client),
        )

    def _cut(self) -> bool:
        return self._paused

    async def _copy(
        self, pipe: _Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward until either side closes; a frozen pipe reads and drops."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK_BYTES):
                if pipe.frozen:
                    continue
                writer.write(data)
                await writer.drain()
        pipe.reset()  # one side ended: end the other


async def _drain_into_nothing(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(CHUNK_BYTES):
            pass
