"""The live page's data on a fake clock: the request trail (off until a page opens, bounded,
per-replica and per-model figures), the 15-minute history, token rates from engine
counters, the snapshot's autoscaler part, and the SSE stream's framing and end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from fleetserve.config import HoldSettings
from fleetserve.engines.llamacpp.adapter import LlamaCppAdapter
from fleetserve.engines.vllm import parse_vllm_signals
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.dashboard import Dashboard, RequestTrail
from fleetserve.gateway.dashboard.history import FleetHistory, FleetSample, TokenRates
from fleetserve.gateway.exchange import Exchange
from fleetserve.gateway.hold import HoldQueue
from fleetserve.routing.snapshot import EngineSignals, ReplicaState
from fleetserve.supervisor import Supervisor
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.testing.clock import FakeClock

M = "m"
FIXTURES = Path(__file__).parent.parent / "fixtures"


def exchange(replica: str | None, *, ttft_s: float | None = 0.1, failed: bool = False) -> Exchange:
    return Exchange(model=M, replica=replica, ttft_s=ttft_s, attempts=1, stream_failed=failed)


def test_the_trail_is_off_until_a_page_opens_and_then_bounded() -> None:
    trail = RequestTrail(length=3)
    assert trail.on is False
    assert trail.since is None
    trail.start(10.0)
    for i in range(5):
        trail.add(f"r{i}", exchange("a"), 200, 0.5, 10.0 + i)
    assert [e.request_id for e in trail.newest(10)] == ["r4", "r3", "r2"]
    entry = trail.newest(1)[0].as_json(now=15.0)
    assert (entry["id"], entry["at_s_ago"], entry["replica"]) == ("r4", 1.0, "a")
    assert (entry["error"], entry["tenant"], entry["tokens_out"]) == (False, None, None)
    # Full, and all three are in the window: the figures cover the span those three do.
    figures = trail.figures(15.0)
    assert figures.span_s == pytest.approx(3.0)
    assert figures.model(M)["requests"] == 3


def test_trail_figures_per_replica_and_model() -> None:
    trail = RequestTrail()
    trail.start(0.0)
    trail.add("ok", exchange("a", ttft_s=0.2), 200, 1.0, 1.0)
    trail.add("5xx", exchange("b", ttft_s=None), 502, 0.1, 1.5)
    trail.add("cut", exchange("a", ttft_s=0.4, failed=True), 200, 2.0, 2.0)
    trail.add("4xx", exchange("b", ttft_s=None), 400, 0.1, 2.5)
    figures = trail.figures(4.0)
    assert figures.span_s == 4.0  # since the trail started
    model = figures.model(M)
    assert model["error_rate"] == pytest.approx(0.5)  # a 5xx and a failed stream of four
    assert model["ttft_p95_s"] == pytest.approx(0.39)  # 0.2 and 0.4, interpolated
    assert model["completed_rps"] == pytest.approx(1.0)
    assert figures.replica("a")["ttft_p95_s"] == pytest.approx(0.39)
    assert figures.replica("b")["ttft_p95_s"] is None
    assert figures.replica("gone")["requests"] == 0
    # A minute later the window is empty again.
    later = trail.figures(70.0).model(M)
    assert later["error_rate"] is None
    assert later["ttft_p95_s"] is None


def test_history_keeps_15_minutes_of_samples() -> None:
    history = FleetHistory(span_s=900.0, step_s=1.0)
    for t in range(2000):
        history.add(M, FleetSample(at=float(t), ready=t % 3, replicas=3, desired=None))
    view = history.view(now=1999.0)
    series = view["models"][M]  # type: ignore[index]
    assert len(series["s_ago"]) == 901
    assert series["s_ago"][0] == 900.0
    assert series["s_ago"][-1] == 0.0
    assert len(series["ready"]) == len(series["desired"]) == 901


def test_token_rates_from_counter_scrapes() -> None:
    rates = TokenRates()
    rates.observe("a", 100.0, scraped_at=1.0)
    assert rates.rate("a") is None  # one scrape: no rate yet
    rates.observe("a", 300.0, scraped_at=2.0)
    assert rates.rate("a") == pytest.approx(200.0)
    rates.observe("a", 999.0, scraped_at=2.0)  # the same scrape seen again: ignored
    assert rates.rate("a") == pytest.approx(200.0)
    rates.observe("a", 50.0, scraped_at=3.0)  # the engine restarted: its counter went down
    assert rates.rate("a") is None
    rates.observe("a", 80.0, scraped_at=3.5)
    assert rates.rate("a") == pytest.approx(60.0)
    rates.observe("a", None, scraped_at=None)  # stale signals dropped: no rate shown
    assert rates.rate("a") is None


def test_engines_report_their_generated_tokens() -> None:
    vllm = parse_vllm_signals((FIXTURES / "vllm_metrics.txt").read_text())
    assert vllm.generation_tokens == 25600.0  # two engines' counters summed
    llama = LlamaCppAdapter().parse_signals((FIXTURES / "llamacpp_metrics.txt").read_text())
    assert llama.generation_tokens == 5120.0
    assert parse_vllm_signals("vllm:num_requests_running 1\n").generation_tokens is None


class Board:
    def __init__(self, view: dict[str, object] | None = None) -> None:
        self.clock = FakeClock(start=100.0)
        self.fleet = Fleet()
        self.fleet.declare_model(M)
        window = LoadWindow()
        holds = HoldQueue(self.fleet, HoldSettings(), self.clock, window, GatewayMetrics(),
                          retry_after_s=2, autoscaled={M})  # fmt: skip
        self.dashboard = Dashboard(
            self.fleet, self.clock, window, holds, RequestTrail(), Supervisor(self.clock),
            autoscaler=None if view is None else (lambda: view),
        )  # fmt: skip

    def add(self, rid: str, state: ReplicaState = ReplicaState.READY) -> Replica:
        replica = Replica(id=rid, url=f"http://{rid}", model=M, state=state)
        self.fleet.add(replica)
        return replica


def decision(i: int, direction: str) -> dict[str, object]:
    return {"at_s_ago": float(i), "direction": direction, "desired": i, "reason": f"why {i}"}


def test_snapshot_with_an_autoscaler() -> None:
    changes = [decision(i, "up") for i in range(20)]
    board = Board({"model": M, "desired": 2, "latest": changes[-1], "recent": changes,
                   "changes": changes})  # fmt: skip
    board.add("a")
    board.add("b", ReplicaState.STARTING)
    board.dashboard.sample()
    snap = board.dashboard.snapshot(board.clock.now())
    models = snap["models"]
    assert isinstance(models, list)
    [model] = models
    assert (model["ready"], model["replicas"], model["desired"]) == (1, 2, 2)
    assert model["can_hold"] is True
    assert model["held"] == 0
    autoscaler = snap["autoscaler"]
    assert isinstance(autoscaler, dict)
    assert [d["desired"] for d in autoscaler["changes"]] == list(range(19, 7, -1))  # newest first
    history = snap["history"]["models"][M]  # type: ignore[index]
    assert (history["ready"], history["replicas"], history["desired"]) == ([1], [2], [2])
    assert snap["requests"] == []
    assert snap["trail_for_s"] is None


def test_tokens_per_second_follow_the_engines_counter() -> None:
    board = Board()
    replica = board.add("a")
    replica.set_signals(EngineSignals(generation_tokens=1000.0), 100.0)
    board.dashboard.sample()
    replica.set_signals(EngineSignals(generation_tokens=1500.0), 102.0)
    board.dashboard.sample()
    rows = board.dashboard.snapshot(102.5)["replicas"]
    assert isinstance(rows, list)
    [row] = rows
    assert row["tokens_per_s"] == 250.0
    assert row["scrape_age_s"] == 0.5
    board.fleet.remove("a")
    assert board.dashboard.rates.rate("a") is None  # a replica that left is forgotten


async def test_the_stream_pushes_snapshots_and_ends_with_bye_on_close() -> None:
    board = Board()
    board.add("a")
    events = board.dashboard.events()
    assert await anext(events) == b"retry: 1000\n\n"
    first = await anext(events)
    assert first.startswith(b"event: snapshot\ndata: ")
    assert first.endswith(b"\n\n")
    assert set(orjson.loads(first.split(b"data: ", 1)[1])) >= {"replicas", "models", "history"}
    assert board.dashboard.viewers == 1
    pending = asyncio.ensure_future(anext(events))
    await board.clock.advance(0.5)  # the next push
    assert (await pending).startswith(b"event: snapshot\n")
    pending = asyncio.ensure_future(anext(events))
    await board.clock.settle()
    board.dashboard.close()  # the gateway begins shutting down: no wait for the next push
    assert (await pending).startswith(b"event: bye\ndata: ")
    with pytest.raises(StopAsyncIteration):
        await anext(events)
    assert board.dashboard.viewers == 0
