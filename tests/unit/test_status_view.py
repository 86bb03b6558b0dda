"""`fleetserve status` rendered at 80 and 120 columns with long ids, models and reasons: the
default view fits, nothing wraps, and only reasons give way (with an ellipsis); `--wide`
shows ids and URLs in full."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

from fleetserve.cli.status import render_status

MODEL = "meta-llama/Llama-3.1-70B-Instruct-long-name"
LONG_REASON = (
    "health probe failed: connect timed out after 2s; ejected for 16s after four failures in "
    "a row on the same replica"
)
SCALE_REASON = (
    "concurrency 7.5 per ready replica is over the target of 6 (tolerance 0.1): up by 1, "
    "stabilised over the 10 s window and limited by the 4-pods-per-15-s policy"
)
NAMES = ("vllm-llama-7d9f8b6c5-x2k4q", "vllm-llama-7d9f8b6c5-b8k2m", "replica-12")
STATES = ("unhealthy", "starting", "draining")


def replica(i: int) -> dict[str, Any]:
    address = f"10.244.{100 + i}.{200 + i}:8000"
    return {
        "id": address, "name": NAMES[i], "url": f"http://{address}", "model": MODEL,
        "state": STATES[i], "state_for_s": 1234.5 * (i + 1), "reason": LONG_REASON,
        "in_flight": 120, "running": 30.0, "waiting": 14.0, "kv_usage_frac": 0.873,
        "seen_s_ago": 3.25, "consecutive_failures": 4,
    }  # fmt: skip


FLEET = {"replicas": [replica(i) for i in range(3)], "held": {MODEL: 2}}
VIEW = {
    "model": MODEL, "desired": 12, "peak_replicas": 16, "replica_seconds": 123456.0,
    "latest": {"current": 10, "ready": 8, "starting": 2, "draining": 0, "held": 2,
               "reason": SCALE_REASON},
    "actuator": {"cold_starts_s": [45.2, 44.9, 46.1]},
    "changes": [{"at_s_ago": 12.0 * i, "current": 9, "desired": 10, "direction": "up",
                 "reason": SCALE_REASON} for i in range(3)],
}  # fmt: skip


def render(width: int, wide: bool = False) -> list[str]:
    out = io.StringIO()
    console = Console(width=width, file=out, color_system=None, legacy_windows=False)
    render_status(console, FLEET, VIEW, 10, wide)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 120])
def test_default_view_fits_and_only_reasons_give_way(width: int) -> None:
    lines = render(width)
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    for name, state in zip(NAMES, STATES, strict=True):
        (row,) = [line for line in lines if name in line]  # one line per replica: no wrap
        assert re.search(rf"^{name} +{state} ", row), row  # name and state in full
        assert row.rstrip().endswith("…")  # the long reason cut, not wrapped
        assert "10.244." not in row  # ids and URLs wait for --wide
    (heading,) = [line for line in lines if MODEL in line and line.startswith("model")]
    assert f"model {MODEL}:" in heading  # the model in full, once per model
    decisions = [line for line in lines if re.search(r"^ *[0-9]+s +9 +10 +up ", line)]
    assert len(decisions) == 3
    assert all(line.rstrip().endswith("…") for line in decisions)
    (last,) = [line for line in lines if line.startswith("last decision:")]
    assert last.endswith("…")


def test_reasons_say_more_on_a_wider_terminal() -> None:
    narrow, wider = render(80), render(120)
    assert len("\n".join(wider)) > len("\n".join(narrow))


@pytest.mark.parametrize("width", [80, 120])
def test_wide_view_shows_ids_urls_and_reasons_in_full(width: int) -> None:
    text = "\n".join(render(width, wide=True))
    for i in range(3):
        address = f"10.244.{100 + i}.{200 + i}:8000"
        assert address in text
        assert f"http://{address}" in text
    assert text.count(LONG_REASON) == 3
    assert "…" not in text.replace(LONG_REASON, "")
    rows = [line for line in text.splitlines() if any(name in line for name in NAMES)]
    assert len(rows) == 3  # still one line per replica: wide runs long rather than wrapping


def test_a_gateway_without_names_shows_ids() -> None:
    fleet = {"replicas": [{**replica(0), "name": None}]}
    out = io.StringIO()
    render_status(Console(width=80, file=out, color_system=None), fleet, None, 10)
    assert "10.244.100.200:8000" in out.getvalue()
    assert "no autoscaler runs" in out.getvalue()
