"""The usage ledger on a fake clock: batching, the spool while the database is away, replay,
overflow, torn lines, adoption of ended processes' spools, flush and stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from fleetserve.supervisor import cancel_all
from fleetserve.tenancy.ledger import (
    ADOPT_EVERY_S,
    LedgerState,
    UsageLedger,
)
from fleetserve.tenancy.model import FinishReason, UsageRow
from fleetserve.tenancy.spool import SpoolFile, decode_row, encode_row, read_batch
from fleetserve.testing.clock import FakeClock
from fleetserve.testing.usage import FakeUsageSink, run_inline, usage_row

LOGGER = "fleetserve.tenancy.ledger"


def row(i: int, **changes: object) -> UsageRow:
    return dataclasses.replace(usage_row(f"req-{i:06d}", n=i), **changes)  # type: ignore[arg-type]


def spool_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("ledger-spool-*.jsonl"))


def spooled_ids(directory: Path) -> list[str]:
    ids: list[str] = []
    for path in spool_paths(directory):
        ids += [r.request_id for r in read_batch(path, 0, 1_000_000).rows]
    return ids


def messages(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and part in r.getMessage()]


async def until(condition: Callable[[], bool], turns: int = 5_000) -> None:
    """Let the loop run until `condition` holds (a bounded number of turns; no time passes)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sink() -> FakeUsageSink:
    return FakeUsageSink()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


Make = Callable[..., UsageLedger]


@pytest.fixture
async def make(clock: FakeClock, sink: FakeUsageSink, spool_dir: Path) -> AsyncIterator[Make]:
    made: list[UsageLedger] = []

    def build(**options: object) -> UsageLedger:
        options.setdefault("offload", run_inline)
        ledger = UsageLedger(options.pop("sink", sink), spool_dir, clock, **options)  # type: ignore[arg-type]
        made.append(ledger)
        return ledger

    yield build
    sink.up()
    for ledger in made:
        stopping = asyncio.ensure_future(ledger.stop())
        for _ in range(100):  # a stop waits at most a write timeout of virtual time
            if stopping.done():
                break
            await clock.advance(1.0)
        await stopping


# -- batching ----------------------------------------------------------------------------------


async def test_rows_wait_up_to_batch_s_and_go_in_one_insert(
    make: Make, sink: FakeUsageSink, clock: FakeClock
) -> None:
    ledger = make(batch_s=0.25, batch_rows=500)
    await ledger.start()
    for i in range(3):
        ledger.record(row(i))
    await clock.advance(0.2)
    assert sink.calls == []
    assert ledger.stats.queued == 3
    await clock.advance(0.05)
    assert sink.calls == [3]
    assert set(sink.rows) == {row(i).request_id for i in range(3)}
    assert ledger.stats.written == 3
    assert ledger.stats.queued == 0
    # The next row starts its own wait.
    await clock.advance(5.0)
    ledger.record(row(3))
    await clock.advance(0.24)
    assert sink.calls == [3]
    await clock.advance(0.01)
    assert sink.calls == [3, 1]


async def test_full_batches_go_at_once_and_the_rest_waits_its_turn(
    make: Make, sink: FakeUsageSink, clock: FakeClock
) -> None:
    ledger = make(batch_s=0.25, batch_rows=10)
    await ledger.start()
    for i in range(25):
        ledger.record(row(i))
    await clock.settle()
    assert sink.calls == [10, 10]
    await clock.advance(0.25)
    assert sink.calls == [10, 10, 5]
    assert len(sink.rows) == 25


# -- the database away -------------------------------------------------------------------------


async def test_a_failed_write_spools_and_the_spool_is_replayed_when_the_database_is_back(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, LOGGER)
    states: list[LedgerState] = []
    ledger = make(batch_rows=4, on_state=states.append)
    await ledger.start()
    sink.down()
    for i in range(6):
        ledger.record(row(i))
    await clock.advance(0.25)
    assert not ledger.stats.db_up
    assert states == [LedgerState.DOWN]
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(6)]
    (path,) = spool_paths(spool_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Later rows go to the spool too, batch by batch, while the database is down.
    for i in range(6, 9):
        ledger.record(row(i))
    await clock.advance(0.25)
    assert ledger.stats.spooled == 9
    assert ledger.stats.queued == 0
    assert ledger.stats.spool_bytes > 0
    assert sink.rows == {}
    sink.up()
    await clock.advance(10.0)
    assert sorted(sink.rows) == [row(i).request_id for i in range(9)]
    assert all(size <= 4 for size in sink.calls)  # replayed in batches
    stats = ledger.stats
    assert (stats.db_up, stats.replayed, stats.spool_bytes, stats.lost) == (True, 9, 0, 0)
    assert states == [LedgerState.DOWN, LedgerState.UP]
    assert spool_paths(spool_dir) == []
    assert len(messages(caplog, "unreachable")) == 1
    (back,) = messages(caplog, "the database is back")
    assert "9 rows were spooled" in back


async def test_probes_back_off_from_half_a_second_to_five_with_one_log_line(
    make: Make, sink: FakeUsageSink, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    ledger = make()
    await ledger.start()
    sink.down()
    ledger.record(row(0))
    await clock.advance(0.25)  # the write fails at 0.25; probes follow 0.5, 1, 2, 4, 5, 5 s on
    assert sink.failures == 1
    await clock.advance(19.75)  # to t=20: probes at 0.75, 1.75, 3.75, 7.75, 12.75, 17.75
    assert sink.failures == 7
    for i in range(1, 200):  # many rows while down: still no more lines
        ledger.record(row(i))
        await clock.advance(0.05)
    assert len(messages(caplog, "unreachable")) == 1
    assert messages(caplog, "the database is back") == []
    sink.up()
    await clock.advance(6.0)
    assert len(sink.rows) == 200
    assert len(messages(caplog, "the database is back")) == 1
    assert len([r for r in caplog.records if r.name == LOGGER]) == 2


async def test_a_write_that_does_not_answer_times_out_and_spools(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    ledger = make(write_timeout_s=2.0)
    await ledger.start()
    sink.hang()
    ledger.record(row(0))
    await clock.advance(0.25)
    waiting = ledger.stats  # the write is still waiting for an answer
    assert (waiting.db_up, waiting.queued) == (True, 1)
    await clock.advance(2.0)
    assert ledger.stats.db_up is False
    assert spooled_ids(spool_dir) == [row(0).request_id]
    sink.up()
    await clock.advance(5.0)
    assert list(sink.rows) == [row(0).request_id]


async def test_a_write_whose_answer_is_lost_is_replayed_without_doubling(
    make: Make, sink: FakeUsageSink, clock: FakeClock
) -> None:
    ledger = make()
    await ledger.start()
    sink.lose_acks(1)  # the rows land, the ledger sees an error and spools them
    for i in range(5):
        ledger.record(row(i))
    await clock.advance(0.25)
    assert len(sink.rows) == 5
    assert not ledger.stats.db_up
    await clock.advance(2.0)
    stats = ledger.stats
    assert (stats.db_up, stats.replayed, stats.duplicates) == (True, 5, 5)
    assert len(sink.rows) == 5


async def test_the_writer_cancelled_mid_write_spools_the_batch(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    ledger = make()
    await ledger.start()
    sink.hang()
    for i in range(3):
        ledger.record(row(i))
    await clock.advance(0.25)
    assert ledger.stats.queued == 3  # in flight
    await cancel_all([ledger._task])  # the event loop shutting down under the ledger
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(3)]
    assert ledger.stats.queued == 0


# -- overflow and a spool that cannot be written -----------------------------------------------


async def test_a_full_queue_sends_rows_to_the_spool_never_dropping_them(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ledger = make(max_queued=10, batch_rows=500)
    await ledger.start()
    for i in range(15):
        ledger.record(row(i))
    assert ledger.stats.queued == 10
    assert ledger.stats.spooled == 5
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(10, 15)]
    assert len(messages(caplog, "the queue's limit")) == 1
    await ledger.flush()
    assert len(sink.rows) == 10
    await clock.advance(0.25)  # the database is up: the spool is replayed
    assert sorted(sink.rows) == [row(i).request_id for i in range(15)]
    assert ledger.stats.db_up
    assert spool_paths(spool_dir) == []


async def test_rows_are_lost_only_when_queue_and_spool_are_both_out_and_it_says_so(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ledger = make(max_queued=5)
    await ledger.start()
    sink.down()
    replace_with_a_file(spool_dir)  # no spool file can be made in it
    for i in range(5):
        ledger.record(row(i))
    await clock.advance(0.25)  # the write fails, the spool too: the rows stay in memory
    assert (ledger.stats.queued, ledger.stats.lost) == (5, 0)
    for i in range(5, 8):
        ledger.record(row(i))  # the queue is full and the spool unwritable: lost
    await clock.advance(1.0)
    assert (ledger.stats.queued, ledger.stats.lost) == (5, 3)
    (lost_line,) = messages(caplog, "LOST")
    assert str(spool_dir) in lost_line
    replace_with_a_directory(spool_dir)
    await clock.advance(0.25)
    assert ledger.stats.spooled == 5
    assert len(messages(caplog, "3 usage rows were lost")) == 1
    sink.up()
    await clock.advance(6.0)
    assert sorted(sink.rows) == [row(i).request_id for i in range(5)]
    assert len(messages(caplog, "LOST")) == 1


# -- reading spools ----------------------------------------------------------------------------


def test_rows_round_trip_through_a_spool_line() -> None:
    rows = [
        row(1),
        row(2, key_prefix=None, replica=None, ttft_s=None, usage_estimated=True),
        row(3, finish_reason=FinishReason.CANCELLED, queue_s=1e-7, e2e_s=123.456789012345),
    ]
    for r in rows:
        line = encode_row(r)
        assert line.startswith(b'{"request_id":')
        assert line.endswith(b"}\n")
        assert line.count(b"\n") == 1
        assert decode_row(line) == r


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"request_id": "x"}', id="missing-fields"),
        pytest.param(encode_row(row(1)).replace(b'"stop"', b'"exploded"'), id="bad-finish"),
        pytest.param(encode_row(row(1))[:-20], id="torn"),
    ],
)
def test_a_line_that_is_no_row_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        decode_row(line)


def test_fields_a_later_version_adds_are_ignored() -> None:
    line = encode_row(row(1)).replace(b'{"request_id"', b'{"request_id"', 1)
    line = line[:-2] + b',"region":"eu"}\n'
    assert decode_row(line) == row(1)


def replace_with_a_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not a directory")


def replace_with_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def write_orphan(directory: Path, name: str, data: bytes) -> Path:
    """A spool file as a process that has ended leaves it: nobody holds its lock."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


async def test_a_torn_last_line_is_skipped_with_a_warning(
    make: Make, sink: FakeUsageSink, spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = b"".join(encode_row(row(i)) for i in range(3))
    write_orphan(spool_dir, "ledger-spool-999999-dead0001-0.jsonl", good + encode_row(row(3))[:37])
    ledger = make()
    await ledger.start()
    assert sorted(sink.rows) == [row(i).request_id for i in range(3)]
    assert ledger.stats.replayed == 3
    (warning,) = messages(caplog, "unreadable")
    assert "1 unreadable line" in warning
    assert spool_paths(spool_dir) == []


async def test_a_whole_row_after_a_torn_fragment_is_kept(
    make: Make, sink: FakeUsageSink, spool_dir: Path
) -> None:
    # A write cut short (disk full), then a later append: the fragment and the row share a line.
    data = encode_row(row(0)) + encode_row(row(1))[:50] + encode_row(row(2)) + b"\n\n"
    write_orphan(spool_dir, "ledger-spool-999999-dead0002-0.jsonl", data)
    ledger = make()
    await ledger.start()
    assert sorted(sink.rows) == [row(0).request_id, row(2).request_id]


async def test_replaying_a_spool_twice_doubles_nothing(
    make: Make, sink: FakeUsageSink, spool_dir: Path
) -> None:
    # A process crashed mid-replay: 4 of its 10 spooled rows are in the database already.
    await sink.insert_usage([row(i) for i in range(4)])
    write_orphan(
        spool_dir, "ledger-spool-999999-dead0003-0.jsonl",
        b"".join(encode_row(row(i)) for i in range(10)),
    )  # fmt: skip
    ledger = make(batch_rows=3)
    await ledger.start()
    assert sorted(sink.rows) == [row(i).request_id for i in range(10)]
    stats = ledger.stats
    assert (stats.replayed, stats.duplicates) == (10, 4)
    assert spool_paths(spool_dir) == []


# -- several processes on one state directory --------------------------------------------------


async def test_only_spools_of_ended_processes_are_taken(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    write_orphan(spool_dir, "ledger-spool-2-dead0004-0.jsonl", encode_row(row(1)))
    alive = SpoolFile.create(spool_dir / "ledger-spool-1-live0001-0.jsonl")  # holds its lock
    alive.append(encode_row(row(0)))
    ledger = make()
    await ledger.start()
    assert list(sink.rows) == [row(1).request_id]
    assert [p.name for p in spool_paths(spool_dir)] == ["ledger-spool-1-live0001-0.jsonl"]
    alive.close()  # its process ends
    await clock.advance(ADOPT_EVERY_S)
    assert sorted(sink.rows) == [row(0).request_id, row(1).request_id]
    assert spool_paths(spool_dir) == []


async def test_a_ledger_leaves_a_live_one_s_spool_and_takes_it_once_it_has_stopped(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    down = FakeUsageSink()
    down.down()
    first = make(sink=down)
    await first.start()
    for i in range(5):
        first.record(row(i))
    await first.flush()
    assert len(spooled_ids(spool_dir)) == 5
    second = make()
    await second.start()
    await clock.advance(ADOPT_EVERY_S + 1)
    assert sink.rows == {}  # the first is alive: its spool is its own
    await first.stop()
    await clock.advance(ADOPT_EVERY_S)
    assert sorted(sink.rows) == [row(i).request_id for i in range(5)]
    assert spool_paths(spool_dir) == []


# -- flush and stop ----------------------------------------------------------------------------


async def test_flush_writes_every_row_recorded_before_it(make: Make, sink: FakeUsageSink) -> None:
    ledger = make(batch_rows=100)
    await ledger.start()
    for i in range(250):
        ledger.record(row(i))
    await ledger.flush()  # no time passes
    assert len(sink.rows) == 250
    assert sink.calls == [100, 100, 50]


async def test_flush_with_the_database_down_puts_everything_in_the_spool(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    ledger = make()
    await ledger.start()
    sink.down()
    ledger.record(row(0))
    await clock.advance(0.25)
    for i in range(1, 4):
        ledger.record(row(i))
    await ledger.flush()
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(4)]
    assert ledger.stats.queued == 0


async def test_flush_against_a_database_that_does_not_answer_takes_one_write_timeout(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path
) -> None:
    ledger = make(write_timeout_s=3.0)
    await ledger.start()
    sink.hang()
    for i in range(3):
        ledger.record(row(i))
    flushing = asyncio.ensure_future(ledger.flush())
    await clock.advance(2.9)
    assert not flushing.done()
    await clock.advance(0.1)
    await until(flushing.done)
    await flushing
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(3)]


async def test_stop_keeps_everything_and_the_next_start_replays_it(
    make: Make, sink: FakeUsageSink, clock: FakeClock, spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ledger = make()
    await ledger.start()
    for i in range(3):
        ledger.record(row(i))
    await ledger.stop()
    assert len(sink.rows) == 3
    sink.down()
    again = make()
    await again.start()
    for i in range(3, 6):
        again.record(row(i))
    await again.stop()  # the database is down: the rows stay in the spool
    again.record(row(6))  # a straggler after stop() goes to the spool as well
    assert len(messages(caplog, "after stop()")) == 1
    assert sorted(spooled_ids(spool_dir)) == [row(i).request_id for i in range(3, 7)]
    sink.up()
    third = make()
    await third.start()
    assert sorted(sink.rows) == [row(i).request_id for i in range(7)]
    assert third.stats.replayed == 4
    assert spool_paths(spool_dir) == []


async def test_record_before_start_is_kept(make: Make, sink: FakeUsageSink) -> None:
    ledger = make()
    ledger.record(row(0))
    await ledger.start()
    await ledger.flush()
    assert list(sink.rows) == [row(0).request_id]


def test_bad_settings_are_refused(sink: FakeUsageSink, clock: FakeClock, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        UsageLedger(sink, tmp_path, clock, batch_rows=0)


# -- logs --------------------------------------------------------------------------------------


class LeakySink:
    """Fails with a driver message that names a password, as some drivers' messages do."""

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        raise OSError("connect to postgresql://fleet:hunter2@db:5432/x failed: password=hunter2")


async def test_log_lines_carry_no_password(
    make: Make, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = make(sink=LeakySink())
    await ledger.start()
    ledger.record(row(0))
    await clock.advance(0.25)
    (line,) = messages(caplog, "unreachable")
    assert "OSError" in line
    assert "hunter2" not in caplog.text
