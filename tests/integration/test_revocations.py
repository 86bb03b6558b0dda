"""Revocations over the real Redis's pub/sub: a published prefix reaches a subscriber on
another connection within 1 s, and a subscriber whose link breaks comes back by itself."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import pytest

from fleetserve.tenancy.revocations import Revocations
from fleetserve.testing.gateway import wait_until
from tests.integration.redis_support import REDIS_URL, TcpProxy, require_redis

pytestmark = pytest.mark.integration
LOGGER = "fleetserve.tenancy.revocations"


@pytest.fixture
async def channel() -> str:
    await require_redis()
    return f"test-revocations-{secrets.token_hex(6)}"


class Listener:
    def __init__(self) -> None:
        self.revoked: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self.subscribed = 0
        self.ready = asyncio.Event()

    def on_revoked(self, prefix: str) -> None:
        self.revoked.put_nowait((prefix, time.monotonic()))

    def on_subscribed(self) -> None:
        self.subscribed += 1
        self.ready.set()


async def test_a_revocation_reaches_another_connection_within_a_second(channel: str) -> None:
    subscriber = Revocations.from_url(REDIS_URL, channel=channel)
    publisher = Revocations.from_url(REDIS_URL, channel=channel)
    listener = Listener()
    task = asyncio.create_task(subscriber.run(listener.on_revoked, listener.on_subscribed))
    try:
        await asyncio.wait_for(listener.ready.wait(), timeout=5)
        for prefix in ("abcd1234", "ZYXW9876"):
            sent = time.monotonic()
            assert await publisher.publish(prefix) == 1
            got, at = await asyncio.wait_for(listener.revoked.get(), timeout=1.0)
            assert got == prefix
            assert at - sent < 1.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await subscriber.close()
        await publisher.close()


async def test_the_subscriber_reconnects_and_says_so_once(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy()
    await proxy.start()
    subscriber = Revocations.from_url(proxy.url, channel=channel)
    publisher = Revocations.from_url(REDIS_URL, channel=channel)
    listener = Listener()
    caplog.set_level(logging.INFO, logger=LOGGER)
    task = asyncio.create_task(subscriber.run(listener.on_revoked, listener.on_subscribed))
    try:
        await asyncio.wait_for(listener.ready.wait(), timeout=5)
        listener.ready.clear()
        await proxy.cut()
        await wait_until(lambda: bool(caplog.records))
        await asyncio.sleep(0.5)  # a few failed reconnections, still one line
        lost = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert len(lost) == 1
        assert "lost" in lost[0]
        await proxy.start()
        await asyncio.wait_for(listener.ready.wait(), timeout=10)
        assert listener.subscribed == 2  # the gateway clears its cache here
        assert await publisher.publish("abcd1234") == 1
        got, _ = await asyncio.wait_for(listener.revoked.get(), timeout=1.0)
        assert got == "abcd1234"
        lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert len(lines) == 2
        assert "again" in lines[1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await subscriber.close()
        await publisher.close()
        await proxy.cut()
