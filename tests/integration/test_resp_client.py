"""The gateway's own RESP client against the real Redis: scripts by SHA, NOSCRIPT and other
errors as redis-py's classes, many concurrent calls pipelined on one connection in order,
and a Redis that hangs or goes away answered with TimeoutError / ConnectionError at once."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from fleetserve.fleet.processes import free_port
from fleetserve.testing.tcp_proxy import TcpProxy
from fleetserve.transport.resp import RespClient
from tests.integration.redis_support import REDIS_URL, isolated_prefix, require_redis

pytestmark = pytest.mark.integration


async def test_scripts_by_sha_and_their_errors() -> None:
    await require_redis()
    client = RespClient(REDIS_URL)
    try:
        sha = await client.script_load("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
        assert await client.evalsha(sha.decode(), 1, "k", "v", 41) == [b"k", b"v", 42]
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(ResponseError):
            await client.eval("return redis.call('NOPE')", 0)
        assert await client.eval("return 7", 0) == 7  # the connection survived the errors
    finally:
        await client.aclose()


async def test_concurrent_calls_are_answered_in_order() -> None:
    async with isolated_prefix("resp") as prefix:
        client = RespClient(REDIS_URL)
        try:
            key = f"{prefix}:n"
            replies = await asyncio.gather(
                *(
                    client.eval("return {ARGV[1], redis.call('INCR', KEYS[1])}", 1, key, i)
                    for i in range(500)
                )
            )
            assert [int(tag) for tag, _ in replies] == list(range(500))
            assert sorted(n for _, n in replies) == list(range(1, 501))
        finally:
            await client.aclose()


async def test_a_hanging_redis_times_out_and_the_next_call_reconnects() -> None:
    await require_redis()
    proxy = TcpProxy("127.0.0.1", 6379)
    port = await proxy.start()
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        assert await client.ping()
        await proxy.pause(hang=True)
        with pytest.raises(TimeoutError):
            await client.ping()
        await proxy.resume()
        assert await client.ping()
    finally:
        await client.aclose()
        await proxy.stop()


async def test_nothing_listening_is_a_connection_error() -> None:
    client = RespClient(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await client.ping()
    await client.aclose()
