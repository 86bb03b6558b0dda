"""`fleetserve bench` as a user runs it against a gateway over simulated engines."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetserve.testing.stack import SimStack, fleetserve_argv, sim_stack

pytestmark = pytest.mark.integration

MODEL = "sim-bench-cli"


@pytest.fixture(scope="module")
def stack() -> Iterator[SimStack]:
    with sim_stack(2, model=MODEL) as running:
        yield running


def bench(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetserve_argv("bench", *args), capture_output=True, text=True, timeout=timeout_s,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_open_loop_run_writes_every_report_file(stack: SimStack, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = bench(
        "--url", stack.url, "--model", MODEL, "--rate", "20", "--arrivals", "constant",
        "--duration", "2", "--output-tokens", "8", "--prompt-tokens", "uniform:lo=8,hi=32",
        "--slo", "ttft_p95=1s,tpot=100ms", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "SIMULATION" in result.stdout  # the gateway says its model is simulated
    for name in ("report.json", "report.csv", "requests.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["requests"] == 40  # 20 req/s constant for 2 s
    assert report["totals"]["errors"] == 0
    assert report["config"]["simulated"] is True
    assert report["fleet"], "the gateway's fleet was sampled"
    assert report["fleet"][0]["replicas_ready"] == 2
    assert report["lag"]["p99_s"] is not None  # measured; its verdict depends on the machine


def test_trace_replay_and_compare(stack: SimStack, tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "timestamp,prompt_tokens,output_tokens\n"
        + "".join(f"{0.1 * i:.1f},{16 + i},{4 + i % 3}\n" for i in range(12))
    )
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = bench(
            "--url", stack.url, "--model", MODEL, "--trace", str(trace), "--duration", "3",
            "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["totals"]["requests"] == 12
        assert report["totals"]["output_tokens"] == sum(4 + i % 3 for i in range(12))
    compared = bench("compare", str(first), str(second / "report.json"))
    assert compared.returncode == 0, compared.stderr
    assert "TTFT p95" in compared.stdout


def test_closed_loop_users_pattern(stack: SimStack, tmp_path: Path) -> None:
    result = bench(
        "--url", stack.url, "--model", MODEL, "--users", "spike:base=1,peak=6,at=0.5,for=1",
        "--duration", "2", "--output-tokens", "4", "--fleet-source", "none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "closed loop" in result.stdout


def test_sweep_reports_a_saturation_verdict(stack: SimStack) -> None:
    result = bench(
        "--url", stack.url, "--model", MODEL, "--rate", "5", "--sweep", "5:2:20",
        "--duration", "1", "--output-tokens", "4", "--fleet-source", "none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "saturation point" in result.stdout
    assert "sweep" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(("--model", "m", "--rate", "1"), "--url", id="no-url"),
        pytest.param(
            ("--url", "http://127.0.0.1:9", "--model", "m"), "exactly one of", id="no-load"
        ),
        pytest.param(
            ("--url", "http://127.0.0.1:9", "--model", "m", "--rate", "wobble:x=1"),
            "wobble",
            id="bad-pattern",
        ),
        pytest.param(
            ("--url", "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--slo", "ttft=fast"),
            "ttft",
            id="bad-slo",
        ),
        pytest.param(("--url", "ftp://x", "--model", "m", "--rate", "1"), "http://", id="bad-url"),
        pytest.param(
            ("compare", "/nonexistent/a.json", "/nonexistent/b.json"),
            "a.json",
            id="compare-missing",
        ),
    ],
)
def test_bad_input_is_one_clear_error(args: tuple[str, ...], words: str) -> None:
    result = bench(*args, timeout_s=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert words in result.stderr, result.stderr


def test_unreachable_target_is_reported_not_crashed(tmp_path: Path) -> None:
    result = bench(
        "--url", "http://127.0.0.1:9", "--model", "m", "--rate", "5", "--duration", "0.5",
        "--fleet-source", "none", "--out", str(tmp_path / "x"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "connect" in result.stdout
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    assert report["totals"]["ok"] == 0
    assert report["errors"]["by_kind"].get("connect", 0) > 0
