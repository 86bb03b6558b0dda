"""The limiters' Lua scripts (package data in tenancy/lua/) and how they are called.

Each script is `common.lua` followed by its own file, sent once and then called by its SHA1
(EVALSHA): one round trip per call. A server that does not know the script (restarted,
flushed, failed over) answers NOSCRIPT: the runner loads it (SCRIPT LOAD) and calls again.
Where a proxy or an ACL refuses SCRIPT or EVALSHA, the runner says so once in the log and
sends the whole script with EVAL from then on: still one round trip, still atomic, and the
limits stay shared (LiteLLM falls back to local limits there, berriai/litellm#32232).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from fleetserve.transport.resp import RespClient

log = logging.getLogger(__name__)

COMMON = "common.lua"
# What proxies and ACLs answer for a command they refuse (Redis ACL: NOPERM; twemproxy,
# Envoy and cloud proxies: unknown or unsupported command).
_REFUSALS = ("unknown command", "unsupported command", "not supported", "command not allowed")


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str


@cache
def lua_source(name: str) -> str:
    """One file of the package's lua/ folder."""
    return (resources.files("fleetserve.tenancy") / "lua" / name).read_text("utf-8")


def lua_script(name: str, source: str) -> LuaScript:
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


@cache
def script(name: str) -> LuaScript:
    """`common.lua` + `name`: what is sent to Redis."""
    return lua_script(name, lua_source(COMMON) + "\n" + lua_source(name))


def refused(exc: ResponseError) -> bool:
    """Whether Redis (or a proxy before it) refuses the command itself, not the script."""
    if isinstance(exc, NoPermissionError):
        return True
    text = str(exc).lower()
    return any(words in text for words in _REFUSALS)


ScriptClient = Redis | RespClient
"""What the runner calls: redis-py's client, or the gateway's `transport.resp.RespClient`
(the same methods, a third of the CPU per call)."""


class ScriptRunner:
    """Calls scripts on one Redis client: EVALSHA, loading on NOSCRIPT, else EVAL."""

    def __init__(self, redis: ScriptClient) -> None:
        self._redis = redis
        self.eval_only = False  # set once SCRIPT or EVALSHA was refused

    async def run(self, lua: LuaScript, keys: list[str], args: list[str | int]) -> Any:
        if not self.eval_only:
            try:
                return await self._redis.evalsha(lua.sha, len(keys), *keys, *args)
            except NoScriptError:
                if await self._load(lua):
                    return await self._redis.evalsha(lua.sha, len(keys), *keys, *args)
            except ResponseError as exc:
                if not refused(exc):
                    raise
                self._refused("EVALSHA", exc)
        return await self._redis.eval(lua.source, len(keys), *keys, *args)

    async def _load(self, lua: LuaScript) -> bool:
        try:
            await self._redis.script_load(lua.source)
        except ResponseError as exc:
            if not refused(exc):
                raise
            self._refused("SCRIPT LOAD", exc)
            return False
        return True

    def _refused(self, command: str, exc: ResponseError) -> None:
        if not self.eval_only:
            log.warning(
                "Redis refuses %s (%s): the limiter sends its scripts with EVAL from now on",
                command,
                str(exc).splitlines()[0][:200],
            )
        self.eval_only = True
