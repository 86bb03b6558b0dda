"""The usage ledger: one row per request, written off the hot path, never lost, never doubled.

`record()` puts a row on a bounded in-memory queue and returns (O(1), no I/O). One writer task
writes the queue to the database in batches (every `batch_s`, or at once when `batch_rows`
wait), one `insert_usage` per batch, each bounded by `write_timeout_s`. The sink inserts
idempotently on `request_id`, which is what makes every retry here safe.

When a write fails (the database is unreachable or does not answer in time) the batch goes to
the spool (tenancy/spool.py: an append-only file in the state directory, fsync'd per batch),
and so do later rows while the database is down. The writer probes it with backoff
(0.5 s doubling to 5 s) by replaying the oldest spooled batch; once one is written it replays
the rest, batch by batch between the live batches, and deletes a spool file only after all
its rows are written. A crash mid-replay leaves the file for the next start, which replays it
again: rows already written are skipped by the database, so nothing is lost or doubled. When
the queue is full (the database is slow) rows go straight to the spool.

Rows are lost in one case only: the database cannot take them, the queue is full and the
spool cannot be written either (disk full, no permission). Then they are counted
(`stats.lost`) and logged once per such outage, at ERROR.

Several gateway workers may share one state directory: each ledger writes its own spool
files, and `start()` (then every `adopt_every_s`) takes over spool files of ledgers whose
process has ended and replays them.

Logs: one line when the database becomes unreachable and one when it is back; never a line
per row; error texts are cut to their first line, with any URL password masked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleetserve.clock import Clock
from fleetserve.errors import ConfigError
from fleetserve.supervisor import Backoff, Supervisor, cancel_all
from fleetserve.tenancy.model import UsageRow
from fleetserve.tenancy.spool import (
    SPOOL_PREFIX,
    SPOOL_SUFFIX,
    Offload,
    SpoolFile,
    claim_orphans,
    encode_row,
    read_batch,
)

__all__ = ["LedgerState", "LedgerStats", "UsageLedger", "UsageSink"]

log = logging.getLogger("fleetserve.tenancy.ledger")

PROBE_BACKOFF = Backoff(base_s=0.5, max_s=5.0)
ADOPT_EVERY_S = 30.0  # how often a running ledger looks for spools of ended processes
START_REPLAY_S = 10.0  # start() replays inline this long at most; the writer does the rest
WRITER_SERVICE = "tenancy/ledger-writer"


class UsageSink(Protocol):
    """Where rows end up: the tenant store's usage table (tenancy/store.py)."""

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        """Insert the rows, skipping request ids already there; how many were new."""
        ...


class LedgerState(enum.StrEnum):
    UP = "up"  # rows go to the database
    DOWN = "down"  # the database is unreachable: rows go to the spool until it is back


@dataclass(frozen=True, slots=True)
class LedgerStats:
    queued: int  # in memory: recorded, not yet in the database or the spool
    written: int  # rows written to the database from the queue
    spooled: int  # rows appended to the spool (database down, or queue full)
    replayed: int  # rows read back from a spool (also ended processes') and written
    duplicates: int  # written rows the database already had (a replay of a write that landed)
    lost: int  # rows in neither the database nor the spool: the spool could not be written
    spool_bytes: int  # spool not yet replayed
    db_up: bool


class UsageLedger:
    def __init__(
        self,
        sink: UsageSink,
        spool_dir: Path,
        clock: Clock,
        *,
        batch_s: float = 0.25,
        batch_rows: int = 500,
        max_queued: int = 100_000,
        write_timeout_s: float = 5.0,
        adopt_every_s: float = ADOPT_EVERY_S,
        on_state: Callable[[LedgerState], None] | None = None,
        supervisor: Supervisor | None = None,
        offload: Offload = asyncio.to_thread,
    ) -> None:
        if min(batch_s, batch_rows, max_queued, write_timeout_s, adopt_every_s) <= 0:
            raise ValueError(
                "batch_s, batch_rows, max_queued, write_timeout_s and adopt_every_s must be > 0"
            )
        self.sink = sink
        self.spool_dir = spool_dir
        self.clock = clock
        self.batch_s = batch_s
        self.batch_rows = batch_rows
        self.max_queued = max_queued
        self.write_timeout_s = write_timeout_s
        self.adopt_every_s = adopt_every_s
        self.on_state = on_state
        self._supervisor = supervisor or Supervisor(clock, backoff=PROBE_BACKOFF)
        self._offload = offload
        self._own_prefix = f"{SPOOL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self._seq = itertools.count()

        self._queue: collections.deque[UsageRow] = collections.deque()
        self._first_at = 0.0  # when the oldest queued row was recorded
        self._inflight: list[UsageRow] = []  # a queue batch being written
        self._kick = asyncio.Event()  # something for the writer: a first row, a full batch...
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

        self._active: SpoolFile | None = None  # the spool file rows are appended to
        self._sealed: collections.deque[SpoolFile] = collections.deque()  # to replay, in order
        self._dirty = False  # appended to `_active` since its last fsync

        self._db_up = True
        self._down_since = 0.0
        self._probes = 0
        self._next_probe_at = 0.0
        self._next_adopt_at = 0.0
        self._outage_spooled = 0
        self._overflowing = False  # the queue was full: one log line per episode
        self._spool_failing = False  # the spool cannot be written: one log line per outage
        self._outage_lost = 0
        self._late_logged = False

        self._written = 0
        self._spooled = 0
        self._replayed = 0
        self._duplicates = 0
        self._lost = 0

    # -- the hot path --------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one row (never blocks, never raises); a full queue sends it to the spool."""
        queue = self._queue
        if len(queue) < self.max_queued and not self._stopped:
            if not queue:
                self._first_at = self.clock.now()
                self._kick.set()
            queue.append(row)
            if len(queue) >= self.batch_rows:
                self._kick.set()
            return
        if self._stopped:
            self._spool_late(row)
            return
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "usage ledger: %d rows wait for the database (the queue's limit); "
                "spooling further rows to %s",
                len(queue), self.spool_dir,
            )  # fmt: skip
        if not self._spool([row]):
            self._lose(1)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take over spools left by ended processes, replay them (up to `START_REPLAY_S`; the
        writer replays the rest), then run the writer."""
        if self._task is not None or self._stopped:
            raise RuntimeError("a usage ledger starts once")
        try:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"the usage ledger's spool directory {self.spool_dir} cannot be created: "
                f"{exc.strerror}"
            ) from exc
        self._adopt()
        deadline = self.clock.now() + START_REPLAY_S
        while self._db_up and self._has_spool() and self.clock.now() < deadline:
            await self._replay_batch()
        self._task = self._supervisor.spawn(WRITER_SERVICE, self._run)

    async def flush(self) -> None:
        """Return once every row recorded before the call is in the database or in the spool
        (fsync'd). Bounded by one write timeout when the database is unreachable."""
        if self._task is None or self._task.done():
            await self._step(forced=True)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(waiter)
        self._kick.set()
        await waiter

    async def stop(self) -> None:
        """Flush, stop the writer and release the spool files (left for the next start)."""
        if self._stopped:
            return
        await self.flush()
        await cancel_all([self._task])
        self._task = None
        self._stopped = True
        # Rows recorded since the flush (a batch the cancellation interrupted is spooled by
        # `_write` itself) go to the spool.
        rows = list(self._queue)
        self._queue.clear()
        if rows and not self._spool(rows):
            self._lose(len(rows))
        for spool in [*self._sealed, *([self._active] if self._active else [])]:
            try:
                spool.sync()
            except OSError as exc:
                self._spool_failed(exc)
            spool.close()
        self._sealed.clear()
        self._active = None
        self._dirty = False
        # Flushes that a cancelled step left unanswered: their rows are in the spool now.
        waiters, self._flush_waiters = self._flush_waiters, []
        _release(waiters)

    @property
    def stats(self) -> LedgerStats:
        spools = [*self._sealed, *([self._active] if self._active else [])]
        return LedgerStats(
            queued=len(self._queue) + len(self._inflight),
            written=self._written,
            spooled=self._spooled,
            replayed=self._replayed,
            duplicates=self._duplicates,
            lost=self._lost,
            spool_bytes=sum(spool.pending_bytes for spool in spools),
            db_up=self._db_up,
        )

    # -- the writer ----------------------------------------------------------------------------

    async def _run(self) -> None:
        if self._inflight:  # the writer failed mid-write (a bug): keep that batch
            rows, self._inflight = self._inflight, []
            self._keep(rows)
        while True:
            self._kick.clear()
            wait_s = self._wait_s()
            if wait_s > 0:
                await self._wait(wait_s)
            await self._step(forced=False)

    def _wait_s(self) -> float:
        """How long the writer may sleep unless kicked."""
        if self._flush_waiters or len(self._queue) >= self.batch_rows:
            return 0.0
        if self._db_up and self._has_spool():
            return 0.0  # replay between live batches
        deadlines = [self._next_adopt_at] if self._db_up else [self._next_probe_at]
        if self._queue:
            deadlines.append(self._first_at + self.batch_s)
        return max(min(deadlines) - self.clock.now(), 0.0)

    async def _wait(self, timeout_s: float) -> None:
        """Until kicked or `timeout_s` has passed on the clock."""
        kicked = asyncio.ensure_future(self._kick.wait())
        timer = asyncio.ensure_future(self.clock.sleep(timeout_s))
        try:
            await asyncio.wait({kicked, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            timer.cancel()

    async def _step(self, *, forced: bool) -> None:
        waiters, self._flush_waiters = self._flush_waiters, []
        try:
            await self._step_once(forced=forced or bool(waiters))
        except BaseException:
            self._flush_waiters[:0] = waiters  # not flushed: the next step (or stop) answers
            raise
        _release(waiters)

    async def _step_once(self, *, forced: bool) -> None:
        now = self.clock.now()
        queue = self._queue
        timed = forced or (bool(queue) and now >= self._first_at + self.batch_s)
        if timed or len(queue) >= self.batch_rows:
            if self._db_up:  # full batches only, unless the oldest row has waited batch_s
                await self._write_queue(now, full_only=not timed)
            if not self._db_up:
                self._spool_queue()
        if not forced:  # a flush waits for no probe, replay or scan
            if not self._db_up:
                if now >= self._next_probe_at:
                    await self._probe()
            elif self._has_spool():
                await self._replay_batch()
            elif now >= self._next_adopt_at:
                self._adopt()
        await self._sync()

    async def _write_queue(self, started_at: float, *, full_only: bool) -> None:
        """Write the rows queued now, in batches; rows recorded meanwhile wait their turn."""
        queue = self._queue
        left = len(queue) - (len(queue) % self.batch_rows if full_only else 0)
        while left > 0 and self._db_up:
            batch = [queue.popleft() for _ in range(min(left, self.batch_rows))]
            left -= len(batch)
            if await self._write(batch, spooled=False):
                self._written += len(batch)
            else:
                self._keep(batch)
        if queue and not full_only:
            self._first_at = started_at  # the rest were all recorded after this step began
        self._overflow_over()

    def _overflow_over(self) -> None:
        if self._overflowing and len(self._queue) < self.max_queued // 2:
            self._overflowing = False

    async def _write(self, rows: list[UsageRow], *, spooled: bool) -> bool:
        """One bounded insert; False (and the ledger is down) when it failed."""
        if not spooled:
            self._inflight = rows
        try:
            inserted = await self._insert(rows)
        except asyncio.CancelledError:
            if not spooled:  # stopping mid-write: the rows must not go with the task
                self._inflight = []
                self._keep(rows)
                self._sync_now()
            raise
        # A write may fail in any way the sink's driver fails (connection refused or reset,
        # timeout, the server shutting down...): the rows stay spooled and the ledger probes.
        except Exception as exc:  # noqa: BLE001
            self._inflight = []
            self._went_down(exc)
            return False
        self._inflight = []
        self._duplicates += max(len(rows) - inserted, 0)
        if not self._db_up:
            self._came_back()
        return True

    async def _insert(self, rows: list[UsageRow]) -> int:
        """`sink.insert_usage(rows)`, or TimeoutError after `write_timeout_s` on the clock."""
        insert = asyncio.ensure_future(self.sink.insert_usage(rows))
        timer = asyncio.ensure_future(self.clock.sleep(self.write_timeout_s))
        try:
            await asyncio.wait({insert, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not insert.done():
                insert.cancel()
                # Its outcome no longer matters (a replay repeats it); retrieve it unraised.
                insert.add_done_callback(_ignore_outcome)
        if not insert.done() or insert.cancelled():
            raise TimeoutError(f"no answer within {self.write_timeout_s:g} s")
        return insert.result()

    async def _probe(self) -> None:
        """Try the database again: replay the oldest spooled batch (or write a queued one,
        when the spool cannot be written and rows wait in memory)."""
        if self._has_spool():
            await self._replay_batch()
        elif self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_rows))]
            if await self._write(batch, spooled=False):
                self._written += len(batch)
            else:
                self._keep(batch)
        else:  # nothing to try it with: wait for rows
            self._next_probe_at = self.clock.now() + PROBE_BACKOFF.delay_s(self._probes, 1.0)

    async def _replay_batch(self) -> None:
        spool = self._replay_file()
        if spool is None:
            return
        if self._dirty:  # never read rows the disk may not have yet
            await self._sync()
        try:
            batch = await self._offload(
                lambda: read_batch(spool.path, spool.offset, self.batch_rows)
            )
        except OSError as exc:
            log.error(  # noqa: TRY400 (one line: the reason is the errno's text)
                "usage ledger: cannot read the spool file %s (%s); leaving it for a later start",
                spool.path, exc.strerror,
            )  # fmt: skip
            self._sealed.remove(spool)
            spool.close()
            return
        if batch.skipped:
            log.warning(
                "usage ledger: skipped %d unreadable line(s) in %s (a write torn by a crash)",
                batch.skipped, spool.path.name,
            )  # fmt: skip
        if batch.rows:
            if not await self._write(batch.rows, spooled=True):
                return
            self._replayed += len(batch.rows)
        spool.offset = batch.end_offset
        if batch.eof:
            self._sealed.remove(spool)
            spool.remove()

    def _replay_file(self) -> SpoolFile | None:
        """The oldest spool to replay; the active file is sealed first (appends go on in a
        new one), so a file is only ever read when nobody writes to it."""
        if self._sealed:
            return self._sealed[0]
        if self._active is not None and self._active.size > 0:
            self._sealed.append(self._active)
            self._active = None
            return self._sealed[0]
        return None

    def _has_spool(self) -> bool:
        return bool(self._sealed) or (self._active is not None and self._active.size > 0)

    def _adopt(self) -> None:
        self._next_adopt_at = self.clock.now() + self.adopt_every_s
        with contextlib.suppress(FileNotFoundError):  # no spool directory: nothing to adopt
            self._sealed.extend(claim_orphans(self.spool_dir, self._own_prefix, self._new_path))

    # -- the spool -----------------------------------------------------------------------------

    def _new_path(self) -> Path:
        return self.spool_dir / f"{self._own_prefix}{next(self._seq)}{SPOOL_SUFFIX}"

    def _spool(self, rows: Sequence[UsageRow]) -> bool:
        """Append rows to the spool (synced at the writer's next step); False if it cannot."""
        try:
            data = b"".join(encode_row(row) for row in rows)
            if self._active is None:
                self._active = SpoolFile.create(self._new_path())
            self._active.append(data)
        except (OSError, TypeError) as exc:
            self._spool_failed(exc)
            return False
        self._dirty = True
        self._spooled += len(rows)
        if not self._db_up:
            self._outage_spooled += len(rows)
        if self._spool_failing:
            self._spool_failing = False
            log.warning(
                "usage ledger: the spool can be written again; %d usage rows were lost",
                self._outage_lost,
            )  # fmt: skip
        return True

    def _spool_late(self, row: UsageRow) -> None:
        """A row recorded after stop(): a spool file of its own, synced and released at once
        (so the next start, or another worker, replays it)."""
        if not self._late_logged:
            self._late_logged = True
            log.warning("usage ledger: rows recorded after stop() go to the spool")
        spool: SpoolFile | None = None
        try:
            spool = SpoolFile.create(self._new_path())
            spool.append(encode_row(row))
            spool.sync()
        except (OSError, TypeError) as exc:
            self._spool_failed(exc)
            self._lose(1)
            return
        finally:
            if spool is not None:
                spool.close()
        self._spooled += 1

    def _spool_queue(self) -> None:
        rows = list(self._queue)
        self._queue.clear()
        if rows:
            self._keep(rows)
        self._overflow_over()

    def _keep(self, rows: list[UsageRow]) -> None:
        """Rows the database did not take: to the spool, else back to the queue's front as far
        as it has room (retried in `batch_s`), else lost."""
        if self._spool(rows):
            return
        room = max(self.max_queued - len(self._queue), 0)
        kept = rows[:room]
        self._queue.extendleft(reversed(kept))
        self._first_at = self.clock.now()
        self._lose(len(rows) - len(kept))

    def _lose(self, count: int) -> None:
        self._lost += count
        self._outage_lost += count

    def _spool_failed(self, exc: Exception) -> None:
        if self._spool_failing:
            return
        self._spool_failing = True
        self._outage_lost = 0
        log.error(
            "usage ledger: cannot write the spool in %s (%s): usage rows the database cannot "
            "take now are LOST (counted in the ledger's lost rows) until it can be written",
            self.spool_dir, _describe(exc),
        )  # fmt: skip

    async def _sync(self) -> None:
        spool = self._active
        if spool is None or not self._dirty:
            return
        self._dirty = False
        try:
            await self._offload(spool.sync)
        except OSError as exc:
            self._spool_failed(exc)

    def _sync_now(self) -> None:
        """`_sync` without awaiting: when the writer is being cancelled."""
        if self._active is not None and self._dirty:
            self._dirty = False
            try:
                self._active.sync()
            except OSError as exc:
                self._spool_failed(exc)

    # -- the database's state ------------------------------------------------------------------

    def _went_down(self, exc: Exception) -> None:
        now = self.clock.now()
        if self._db_up:
            self._db_up = False
            self._down_since = now
            self._probes = 0
            self._outage_spooled = 0
            log.warning(
                "usage ledger: the database is unreachable (%s); spooling usage rows to %s "
                "until it is back",
                _describe(exc), self.spool_dir,
            )  # fmt: skip
            self._notify(LedgerState.DOWN)
        self._probes += 1
        self._next_probe_at = now + PROBE_BACKOFF.delay_s(self._probes, 1.0)

    def _came_back(self) -> None:
        self._db_up = True
        pending = sum(spool.pending_bytes for spool in self._sealed)
        pending += self._active.pending_bytes if self._active else 0
        log.warning(
            "usage ledger: the database is back after %.1f s; %d rows were spooled meanwhile, "
            "replaying %d bytes of spool",
            self.clock.now() - self._down_since, self._outage_spooled, pending,
        )  # fmt: skip
        self._notify(LedgerState.UP)

    def _notify(self, state: LedgerState) -> None:
        if self.on_state is not None:
            self.on_state(state)


def _release(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _ignore_outcome(task: asyncio.Future[int]) -> None:
    if not task.cancelled():
        task.exception()


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_SETTING = re.compile(r"(password\s*[=:]\s*)\S+", re.IGNORECASE)


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message`, short, with any password masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _PASSWORD_SETTING.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
