"""Log output: `console` (readable lines) or `json` (one JSON object per line), and the
access line written once per /v1 request.

With `json`, every stdlib log record of the process (fleetserve's, uvicorn's) is rendered by
structlog's `ProcessorFormatter` into one JSON object per line: `timestamp`, `level`,
`logger`, `event`, and a one-line `exception` when there is one. The access lines carry the
same four keys and the request's fields.

The access line is on the hot path, so it is not a structlog or stdlib log call: structlog's
bound-logger pipeline cost 8 us a line here and stdlib logging with a JSON formatter 20 us
(benchmarks/README.md, "Observability"), where the whole budget of tracing and logging
together is 5 % of a ~100 us request. It is one `orjson.dumps` of a dict, buffered and
written FLUSH_AFTER_S after the first line of a batch (every line of those 50 ms in one
write, or sooner at FLUSH_AT_BYTES), so a line is out within 50 ms and costs no system call
of its own (a write per event-loop iteration would be one every few requests on a busy
worker). A console line is rendered by structlog's `ConsoleRenderer`.

Nothing here logs a key, a prompt or a completion: the access line's fields are fixed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

import orjson
import structlog

ACCESS_LOGGER = "fleetserve.access"
LOG_FORMATS = ("console", "json")
FLUSH_AT_BYTES = 64 * 1024
FLUSH_AFTER_S = 0.05  # a line waits this long at most for the lines after it (one write)


def _json_processors() -> list[Any]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(log_format: str, level: str = "warning") -> None:
    """Route the process's stdlib logging through one handler on stderr. `json`: each
    record one JSON object per line; `console`: left as it is (uvicorn's own lines, and
    Python's last-resort handler for fleetserve's warnings)."""
    if log_format != "json":
        return
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_json_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # a traceback as one string field
            structlog.processors.JSONRenderer(serializer=_dumps_text),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


def _dumps_text(value: Any, **kw: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def write_json_line(event: str, logger: str, level: str = "info", **fields: object) -> None:
    """One JSON object on stderr now, in the access lines' shape (a command's own messages
    under `--log-format json`, which its log level does not filter)."""
    stamp = _Clock().iso(time.time())
    line = {"timestamp": stamp, "level": level, "logger": logger, "event": event, **fields}
    sys.stderr.buffer.write(orjson.dumps(line, default=str) + b"\n")
    sys.stderr.buffer.flush()


class _Clock:
    """UTC ISO 8601 timestamps with milliseconds, the date part formatted once a second and
    the whole once a millisecond (a busy worker writes several lines in one)."""

    __slots__ = ("_milli", "_prefix", "_second", "_stamp")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._stamp = ""

    def iso(self, now: float) -> str:
        milli = int(now * 1000)
        if milli == self._milli:
            return self._stamp
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._stamp = f"{self._prefix}.{milli - second * 1000:03d}Z"
        return self._stamp


class AccessLog:
    """Writes one access line per request to `stream` (binary; default stderr)."""

    def __init__(self, log_format: str, stream: BinaryIO | None = None) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format: one of {', '.join(LOG_FORMATS)}; not {log_format!r}")
        self.json = log_format == "json"
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._pending: list[bytes] = []
        self._size = 0
        self._clock = _Clock()
        self._console = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)

    def write(self, fields: Mapping[str, object], now: float | None = None) -> None:
        """Queue one line (`fields` in order after timestamp, level, logger and event)."""
        stamp = self._clock.iso(time.time() if now is None else now)
        if self.json:
            line = orjson.dumps(
                {"timestamp": stamp, "level": "info", "logger": ACCESS_LOGGER,
                 "event": "request", **fields},
                default=str, option=orjson.OPT_APPEND_NEWLINE,
            )  # fmt: skip
        else:
            shown = {"timestamp": stamp, "level": "info", "event": "request",
                     **{k: v for k, v in fields.items() if v is not None}}  # fmt: skip
            line = self._console(None, "info", shown).encode() + b"\n"
        first = not self._pending
        self._pending.append(line)
        self._size += len(line)
        if self._size >= FLUSH_AT_BYTES:
            self.flush()
        elif first:
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self.flush)
            except RuntimeError:  # no event loop: write it now
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing to tell it with
            pass

    def close(self) -> None:
        self.flush()
