"""vLLM's /metrics text mapped to engine signals, for vLLM itself and the simulated engine.

tests/fixtures/vllm_metrics.txt follows vLLM V1's metric list (vllm/v1/metrics/loggers.py):
two engines (data parallel) of one model, HELP/TYPE lines, counters, histograms, both KV usage
names (the deprecated `vllm:gpu_cache_usage_perc` next to `vllm:kv_cache_usage_perc`), process
metrics, and a metric whose name extends `vllm:num_requests_running`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.engines.adapter import LaunchSpec
from fleetserve.engines.sim.adapter import SimAdapter
from fleetserve.engines.sim.engine import SimEngine
from fleetserve.engines.sim.profiles import PROFILES
from fleetserve.engines.vllm import VllmAdapter, parse_vllm_signals, sample_values
from fleetserve.routing.snapshot import EngineSignals
from fleetserve.testing.clock import FakeClock

FIXTURE = Path(__file__).parent.parent / "fixtures" / "vllm_metrics.txt"


@pytest.fixture(scope="module")
def vllm_text() -> str:
    return FIXTURE.read_text()


def test_signals_sum_running_and_waiting_over_engines(vllm_text: str) -> None:
    signals = parse_vllm_signals(vllm_text)
    assert signals.running == 12.0
    assert signals.waiting == 3.0
    # The current name wins over the deprecated one; engines' fractions are averaged.
    assert signals.kv_usage_frac == pytest.approx(0.375)


def test_the_deprecated_kv_name_is_the_fallback(vllm_text: str) -> None:
    older = "\n".join(
        line for line in vllm_text.splitlines() if "vllm:kv_cache_usage_perc" not in line
    )
    assert parse_vllm_signals(older).kv_usage_frac == pytest.approx(0.9)


def test_agrees_with_prometheus_clients_parser(vllm_text: str) -> None:
    reference: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(vllm_text):
        for sample in family.samples:
            reference.setdefault(sample.name, []).append(sample.value)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # fmt: skip
        assert sample_values(vllm_text, name) == reference[name], name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", EngineSignals(), id="empty"),
        pytest.param("# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n",
                     EngineSignals(), id="help-and-type-only"),
        pytest.param("vllm:num_requests_running 4\nvllm:num_requests_waiting 1",
                     EngineSignals(running=4.0, waiting=1.0), id="no-labels-no-final-newline"),
        pytest.param('vllm:num_requests_running{model_name="a b}c"} 2 1700000000000\n',
                     EngineSignals(running=2.0), id="odd-label-and-timestamp"),
        pytest.param("vllm:num_requests_waiting{engine=\"0\"} NaN\n"
                     "vllm:num_requests_waiting{engine=\"1\"} 2\n",
                     EngineSignals(waiting=2.0), id="nan-skipped"),
        pytest.param("vllm:num_requests_running_peak 9\nxvllm:num_requests_running 9\n",
                     EngineSignals(), id="longer-names-do-not-match"),
    ],
)  # fmt: skip
def test_edge_cases_of_the_text_format(text: str, expected: EngineSignals) -> None:
    assert parse_vllm_signals(text) == expected


async def test_the_simulated_engines_metrics_read_like_vllms() -> None:
    clock = FakeClock()
    profile = PROFILES["a10g"].with_overrides(max_num_seqs=1, cold_start_s=0.0)
    engine = SimEngine(profile, "sim-model", clock)
    await engine.start()
    for i in range(3):
        engine.submit([f"p{i}-{t}" for t in range(100)], 50)
    await clock.advance(0.2)
    text = generate_latest(engine.registry).decode()
    signals = SimAdapter().parse_signals(text)
    gauges = engine.gauges()
    assert (signals.running, signals.waiting) == (1.0, 2.0)
    assert signals.kv_usage_frac == pytest.approx(gauges.kv_usage_frac)
    assert 0.0 < gauges.kv_usage_frac < 0.01
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["vllm:num_requests_running"] == "gauge"
    assert families["vllm:prompt_tokens"] == "counter"
    assert families["vllm:request_success"] == "counter"
    assert families["vllm:time_to_first_token_seconds"] == "histogram"
    assert families["vllm:e2e_request_latency_seconds"] == "histogram"
    await engine.stop()


def test_vllm_adapter_launches_vllm_serve() -> None:
    spec = LaunchSpec(model="m", port=8001, options={"max_num_seqs": "64", "enforce_eager": ""})
    adapter = VllmAdapter()
    assert adapter.launch_command(spec) == [
        "vllm", "serve", "m", "--host", "127.0.0.1", "--port", "8001",
        "--max-num-seqs", "64", "--enforce-eager",
    ]  # fmt: skip
    assert (adapter.health_path, adapter.metrics_path) == ("/health", "/metrics")


def test_sim_adapter_launches_this_python_with_a_profile() -> None:
    command = SimAdapter().launch_command(LaunchSpec(model="m", port=9, options={}))
    assert command[:5] == [sys.executable, "-m", "fleetserve", "engine", "sim"]
    assert command[command.index("--profile") + 1] == "a10g"
    chosen = SimAdapter().launch_command(
        LaunchSpec(model="m", port=9, options={"profile": "h100", "cold_start_s": "0"})
    )
    assert chosen[-4:] == ["--profile", "h100", "--cold-start-s", "0"]
