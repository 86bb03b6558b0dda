"""Revoked keys leave every gateway's key cache at once, over Redis pub/sub.

The admin API that revokes (or rotates past its grace) a key calls `publish(prefix)`; every
gateway process runs `run(on_revoked)`, which calls `on_revoked(prefix)` for each message so
that the gateway drops the key from its cache. Without Redis, or while the subscription is
down, the cache TTL (`key_cache_ttl_s`) still bounds how long a revoked key is trusted. A
message published while a subscriber was away is lost to it, so `on_subscribed` is called on
every (re)subscription: the gateway clears its whole cache there.

The subscriber reconnects with exponential backoff, saying once when it lost the channel and
once when it has it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from fleetserve.clock import Clock, RealClock

log = logging.getLogger(__name__)

CHANNEL = "fleetserve:revocations"
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
POLL_S = 1.0  # a quiet channel is read this long at a time
HEALTH_CHECK_S = 5.0  # redis-py pings a quiet subscription this often (finds dead links)
_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class Revocations:
    def __init__(
        self,
        redis: Redis,
        *,
        channel: str = CHANNEL,
        owns_client: bool = False,
        clock: Clock | None = None,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self._redis = redis
        self.channel = channel
        self._owns_client = owns_client
        self._clock = clock or RealClock()
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s

    @classmethod
    def from_url(cls, url: str, *, channel: str = CHANNEL, timeout_s: float = 1.0) -> Revocations:
        """On a client of its own (a subscription holds a connection), closed with it."""
        client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_S,
        )
        return cls(client, channel=channel, owns_client=True)

    async def publish(self, prefix: str) -> int:
        """Tell every gateway that the key `prefix` is revoked; returns how many listen."""
        return int(await self._redis.publish(self.channel, prefix))

    async def run(
        self,
        on_revoked: Callable[[str], None],
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        backoff = self.first_backoff_s
        lost = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if lost:
                    log.warning("revocations: subscribed to %s again", self.channel)
                    lost = False
                backoff = self.first_backoff_s
                if on_subscribed is not None:
                    on_subscribed()
                while True:
                    message = await pubsub.get_message(timeout=POLL_S)
                    if message is not None and message.get("type") == "message":
                        prefix = _text(message.get("data"))
                        if prefix:
                            on_revoked(prefix)
            except _ERRORS as exc:
                if not lost:
                    log.warning(
                        "revocations: lost %s (%s); revoked keys still leave the key cache "
                        "within its TTL; reconnecting",
                        self.channel,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                    )
                    lost = True
            finally:
                await _quietly_close(pubsub)
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()


def _text(data: object) -> str | None:
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return data if isinstance(data, str) else None


async def _quietly_close(pubsub: PubSub) -> None:
    """Close a subscription whose connection may already be broken."""
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 7
    except _ERRORS:
        log.debug("revocations: closing a broken subscription failed", exc_info=True)
