"""An in-process fake engine with scripted faults, for gateway tests.

It speaks just enough of the OpenAI API (chat and completions, stream and not) and can be
told to misbehave: answer 5xx or 4xx, hang before answering, stall or die mid-stream, or
stop accepting connections. It records what it received so tests can assert on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import orjson
from aiohttp import web

Fault = Literal["none", "status", "hang", "die_mid_stream", "stall_mid_stream"]


@dataclass
class FakeEngineState:
    fault: Fault = "none"
    fault_status: int = 500
    chunks: int = 8
    chunk_delay_s: float = 0.0
    pad_bytes: int = 0  # extra characters in each chunk's text (big streams)
    chatter: bool = False  # a role-only chunk first and a comment line before every chunk
    fail_after_chunks: int = 2
    stream_usage: bool = False  # a usage chunk when the request asks (stream_options), as vLLM
    finish_reason: str | None = None  # on a stream's last chunk (None: none)
    received: list[bytes] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)  # each request's header
    cancelled: int = 0
    completed: int = 0
    active: int = 0
    healthy: bool = True


def _chunk(
    i: int, model: str, chat: bool, pad_bytes: int = 0, finish_reason: str | None = None
) -> bytes:
    text = f"t{i} " + "x" * pad_bytes
    if chat:
        payload: dict[str, object] = {
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [{"index": 0, "delta": {"content": text},
                                         "finish_reason": finish_reason}],
        }  # fmt: skip
    else:
        payload = {
            "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}],
        }  # fmt: skip
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _usage_chunk(model: str, completion_tokens: int) -> bytes:
    usage = {"prompt_tokens": 3, "completion_tokens": completion_tokens,
             "total_tokens": 3 + completion_tokens}  # fmt: skip
    payload = {"id": "fake", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [], "usage": usage}  # fmt: skip
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class FakeEngine:
    """`async with FakeEngine() as engine:` serves on 127.0.0.1 at `engine.url`."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.state = FakeEngineState()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeEngine:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))  # port 0 first; the same port on restart()
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Serve again on the same port after `stop()`."""
        await self.__aenter__()

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"ok": self.state.healthy}, status=200 if self.state.healthy else 503
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{model_name="m"}} {self.state.active}\n'
            'vllm:num_requests_waiting{model_name="m"} 0\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.state.received.append(raw)
        self.state.traceparents.append(request.headers.get("traceparent"))
        body = orjson.loads(raw)
        chat = request.path.endswith("chat/completions")
        state = self.state
        state.active += 1
        try:
            if state.fault == "status":
                return web.json_response(
                    {"error": {"message": f"fake {state.fault_status}", "type": "server_error",
                               "param": None, "code": None}},
                    status=state.fault_status,
                )  # fmt: skip
            if state.fault == "hang":
                await asyncio.sleep(3600)
            if body.get("stream"):
                return await self._stream(
                    request, body.get("model", ""), chat, body.get("stream_options")
                )
            await asyncio.sleep(state.chunk_delay_s * state.chunks)
            text = "".join(f"t{i} " for i in range(state.chunks))
            message = {"role": "assistant", "content": text}
            choice: dict[str, object] = (
                {"index": 0, "message": message, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            state.completed += 1
            return web.json_response(
                {"id": "x", "object": "chat.completion" if chat else "text_completion",
                 "created": 0, "model": body.get("model"), "choices": [choice],
                 "usage": {"prompt_tokens": 3, "completion_tokens": state.chunks,
                           "total_tokens": 3 + state.chunks},
                 "served_by": self.name},
            )  # fmt: skip
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        finally:
            state.active -= 1

    async def _stream(
        self, request: web.Request, model: str, chat: bool, options: object = None
    ) -> web.StreamResponse:
        state = self.state
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if state.chatter and chat:  # as vLLM starts, and as proxies keep connections alive
            role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            await response.write(b"data: " + orjson.dumps(role) + b"\n\n")
        for i in range(state.chunks):
            if state.chatter:
                await asyncio.sleep(state.chunk_delay_s)
                await response.write(b": keep-alive\n\n")
            if i == state.fail_after_chunks and state.fault == "die_mid_stream":
                assert request.transport is not None
                request.transport.abort()  # a crash: the connection drops without an end
                return response
            if i == state.fail_after_chunks and state.fault == "stall_mid_stream":
                await asyncio.sleep(3600)
            await asyncio.sleep(state.chunk_delay_s)
            last = i == state.chunks - 1
            reason = state.finish_reason if last else None
            await response.write(_chunk(i, model, chat, state.pad_bytes, reason))
        if state.stream_usage and isinstance(options, dict) and options.get("include_usage"):
            await response.write(_usage_chunk(model, state.chunks))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        state.completed += 1
        return response


@contextlib.asynccontextmanager
async def fake_engines(n: int) -> AsyncIterator[list[FakeEngine]]:
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(FakeEngine(f"fake-{i}")) for i in range(n)]
        yield engines
