"""Cleaning up after tests and benchmarks that use the real Redis under a prefix of their own."""

from __future__ import annotations

from redis.asyncio import Redis

DELETE_BATCH = 500


async def delete_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix:` (SCAN, then DEL in batches; others' keys untouched)."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), DELETE_BATCH):
            await client.delete(*keys[start : start + DELETE_BATCH])
    finally:
        await client.aclose()
