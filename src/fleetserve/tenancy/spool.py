"""The ledger's spool: usage rows kept on local disk while the database cannot take them.

A spool file is append-only JSON lines, one `UsageRow` a line (orjson, fields in the row's
order, so every line starts with `{"request_id":`), mode 0600, in the state directory. Each
ledger instance writes its own files, named `ledger-spool-<pid>-<token>-<seq>.jsonl`, and
holds an exclusive `flock` on each file it owns for as long as it owns it. The kernel drops
that lock when the process ends, however it ends (SIGKILL included), so "nobody holds the
lock" is the test of a file left by a process that is gone: more reliable than checking its
pid, which may have been reused, or may belong to another pid namespace (two containers
sharing one volume). An orphan is taken by locking it and then renaming it to the taker's
name, so two starting processes never both take it (and replaying it twice would still be
harmless: writes are idempotent on request_id).

Reading is forgiving: a line torn by a crash mid-write is skipped, and a torn fragment
followed by a whole line (a write cut short by a full disk, then a later append) still gives
back the whole line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from fleetserve.tenancy.model import FinishReason, UsageRow

log = logging.getLogger("fleetserve.tenancy.ledger")

SPOOL_PREFIX = "ledger-spool-"
SPOOL_SUFFIX = ".jsonl"
ROW_START = b'{"request_id":'
# Rows are a few hundred bytes; a longer "line" is corruption, skipped without being held.
MAX_LINE_BYTES = 1 << 20
_OWNER_PID = re.compile(rf"^{SPOOL_PREFIX}(\d+)-")
_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRow))
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(UsageRow)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)

_T = TypeVar("_T")


class Offload(Protocol):
    """Where blocking file work (fsync, reading a spool) runs: `asyncio.to_thread` in
    production, inline in tests on a fake clock."""

    def __call__(self, fn: Callable[[], _T], /) -> Awaitable[_T]: ...


def encode_row(row: UsageRow) -> bytes:
    """One spool line, newline included."""
    return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)


def decode_row(line: bytes) -> UsageRow:
    """The row of one spool line; ValueError when it is not one."""
    data: Any = orjson.loads(line)  # JSONDecodeError is a ValueError
    if not isinstance(data, dict):
        raise ValueError("a spool line is not a JSON object")  # noqa: TRY004 (bad data)
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ValueError(f"a spool line lacks {', '.join(missing)}")
    # Fields a later version added have defaults; fields it dropped are ignored.
    fields = {name: data[name] for name in _FIELDS if name in data}
    fields["finish_reason"] = FinishReason(fields["finish_reason"])
    return UsageRow(**fields)


def parse_line(line: bytes) -> UsageRow | None:
    """The row of a line, salvaging a whole row written after a torn fragment; None if none."""
    try:
        return decode_row(line)
    except (ValueError, TypeError):
        pass
    start = line.rfind(ROW_START)
    if start > 0:
        with contextlib.suppress(ValueError, TypeError):
            return decode_row(line[start:])
    return None


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    rows: list[UsageRow]
    end_offset: int  # where the next batch starts
    skipped: int  # lines that held no readable row (torn by a crash, or corrupt)
    eof: bool  # the file has nothing after end_offset


def read_batch(path: Path, offset: int, max_rows: int) -> SpoolBatch:
    """Up to `max_rows` rows of a sealed spool file (nobody appends to it) from `offset`."""
    rows: list[UsageRow] = []
    skipped = 0
    eof = False
    with path.open("rb") as file:
        file.seek(offset)
        while len(rows) < max_rows:
            line = file.readline(MAX_LINE_BYTES)
            if not line:
                eof = True
                break
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                skipped += 1
                _skip_to_newline(file)
                continue
            if not line.strip():
                continue
            row = parse_line(line)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
        end = file.tell()
        if not eof:
            eof = not file.read(1)
    return SpoolBatch(rows, end, skipped, eof)


def _skip_to_newline(file: Any) -> None:
    # Bounded by the file's size: each read consumes up to MAX_LINE_BYTES of it.
    while chunk := file.readline(MAX_LINE_BYTES):
        if chunk.endswith(b"\n"):
            return


class SpoolFile:
    """A spool file this process owns: it holds the file's flock through `fd` until closed.

    `size` counts the bytes in it, `offset` how far it has been replayed into the database
    (in memory only: after a crash the next owner replays it from the start, which is safe).
    """

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.offset = 0

    @classmethod
    def create(cls, path: Path) -> SpoolFile:
        """A new, empty, locked spool file (mode 0600); OSError when it cannot be made."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fsync_dir(path.parent)  # the file's name survives a power cut with its rows
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return cls(path, fd, 0)

    @classmethod
    def claim(cls, path: Path, new_path: Path) -> SpoolFile | None:
        """Take `path` when no live process holds it, renamed to `new_path`; None when its
        owner is alive or another process took it first. OSError when it cannot be opened."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # its owner is alive (or another process is taking it)
        try:
            stat = os.fstat(fd)
            try:
                same = os.stat(path).st_ino == stat.st_ino
            except FileNotFoundError:
                same = False
            if not same:  # another process took it, replayed it and removed it meanwhile
                os.close(fd)
                return None
            os.rename(path, new_path)
            fsync_dir(new_path.parent)
        except OSError:
            os.close(fd)
            raise
        return cls(new_path, fd, stat.st_size)

    @property
    def pending_bytes(self) -> int:
        return max(self.size - self.offset, 0)

    def append(self, data: bytes) -> None:
        """Write all of `data` at the end (not yet synced); OSError (ENOSPC...) when it cannot."""
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "no space left for the spool")
            self.size += written
            view = view[written:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        """Release the lock (the file stays, for this process's next start or another's)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Delete the file once its rows are in the database, then release it."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_files(spool_dir: Path) -> Iterator[Path]:
    """Every spool file in the directory, oldest first."""

    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    found = sorted(spool_dir.glob(f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}"), key=lambda p: (mtime(p), p))
    return iter(found)


def owner_pid(path: Path) -> int | None:
    match = _OWNER_PID.match(path.name)
    return int(match.group(1)) if match else None


def claim_orphans(
    spool_dir: Path, own_prefix: str, new_path: Callable[[], Path]
) -> list[SpoolFile]:
    """Take every spool file in `spool_dir` whose owner is gone (see the module docstring);
    files named with `own_prefix` are this instance's own and are not looked at."""
    claimed: list[SpoolFile] = []
    for path in spool_files(spool_dir):
        if path.name.startswith(own_prefix):
            continue
        try:
            spool = SpoolFile.claim(path, new_path())
        except OSError as exc:
            log.warning("usage ledger: cannot take the spool file %s (%s)", path, exc.strerror)
            continue
        if spool is not None:
            pid = owner_pid(path)
            log.info(
                "usage ledger: took the spool of stopped process %s (%s, %d bytes) to replay",
                pid if pid is not None else "?", path.name, spool.size,
            )  # fmt: skip
            claimed.append(spool)
    return claimed
