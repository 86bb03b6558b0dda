"""Bad input to any command, run as a process: one `error:` line on stderr, exit status 2,
never a traceback. Also the usage errors that click would draw as a framed box."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.testing.stack import env_without_settings, fleetserve_argv

pytestmark = pytest.mark.integration

UPSTREAM = ("--model", "m", "--upstream", f"http://{LOOPBACK}:9")
# `up` with an engine that is not installed here: were the settings not checked first, it
# would fail on that (another message) rather than start engines.
UP = ("up", "--engine", "vllm", "--model", "m")
BAD_FLEET_GATEWAY = "models: [{name: m, replicas: ['http://127.0.0.1:9']}]\n" \
    "gateway: {timeouts: {first_byte_s: -1}}\n"  # fmt: skip


def run(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetserve_argv(*args), capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL, env=env_without_settings(**env), check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        pytest.param(("gateway", "--workers", "0", *UPSTREAM), {}, "invalid --workers: 0",
                     id="gateway-workers-0"),
        pytest.param(("gateway", "--port", "70000", *UPSTREAM), {}, "invalid --port: 70000",
                     id="gateway-port-70000"),
        pytest.param(("gateway", *UPSTREAM), {"FLEETSERVE_TIMEOUTS__FIRST_BYTE_S": "abc"},
                     "invalid FLEETSERVE_TIMEOUTS__FIRST_BYTE_S: 'abc'", id="gateway-env-nested"),
        pytest.param(("gateway", "--fleet-file", "{fleet}"), {},
                     "invalid gateway.timeouts.first_byte_s in fleet file", id="gateway-fleet"),
        pytest.param(("gateway", "--port", "abc", *UPSTREAM), {}, "'--port'",
                     id="gateway-port-not-a-number"),
        pytest.param(("gateway", "--bogus"), {}, "No such option: --bogus", id="unknown-option"),
        pytest.param((*UP, "--workers", "0"), {}, "invalid --workers: 0",
                     id="up-workers-0"),
        pytest.param((*UP, "--port", "70000"), {}, "invalid --port: 70000",
                     id="up-port-70000"),
        pytest.param(UP, {"FLEETSERVE_PORT": "x"},
                     "invalid FLEETSERVE_PORT: 'x'", id="up-env"),
        pytest.param((*UP, "--replicas", "x"), {}, "--replicas",
                     id="up-replicas"),
        pytest.param(("autoscaler", "--gateway", "http://127.0.0.1:9", "--model", "m",
                      "--deployment", "d", "--min", "-1"), {}, "'--min'", id="autoscaler-min"),
        pytest.param(("autoscaler", "--model", "m"), {}, "Missing option '--gateway'",
                     id="autoscaler-missing"),
        pytest.param(("status", "--url", "ftp://x"), {}, "http://", id="status-url"),
        pytest.param(("status", "--decisions", "0"), {}, "'--decisions'", id="status-decisions"),
        pytest.param(("bench", "--url", "ftp://x", "--model", "m", "--rate", "1"), {},
                     "http://", id="bench-url"),
        pytest.param(("bench", "--url", "http://127.0.0.1:9", "--model", "m", "--rate", "1",
                      "--timeout", "0"), {}, "'--timeout'", id="bench-timeout"),
        pytest.param(("engine", "sim", "--port", "70000", "--model", "m", "--profile",
                      "instant"), {}, "'--port'", id="sim-port"),
        pytest.param(("engine", "sim", "--port", "{port}", "--model", "m", "--profile", "h200"),
                     {}, "unknown sim profile 'h200'", id="sim-profile"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], words: str
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(BAD_FLEET_GATEWAY)
    if args[0] == "up" and "--port" not in args and "FLEETSERVE_PORT" not in env:
        args = (*args, "--port", str(free_port()))
    args = tuple(a.format(fleet=fleet, port=free_port()) for a in args)
    result = run(args, env)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert words in lines[0]
    assert result.returncode == 2, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("--help",), "Usage: ", id="root-help"),
        pytest.param(("--version",), "fleetserve ", id="version"),
        pytest.param(("gateway", "--help"), "Example", id="gateway-help"),
        pytest.param(("status", "--help"), "--wide", id="status-help"),
        pytest.param(("engine", "sim", "--help"), "Example", id="sim-help"),
    ],
)
def test_help_and_version_still_exit_0(args: tuple[str, ...], expected: str) -> None:
    result = run(args, {})
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_root_help_claims_no_cost_analysis() -> None:
    """The `cost` command does not exist yet, so nothing may promise it (the usage ledger's
    per-request cost is another thing, and `usage` may say so)."""
    result = run(("--help",), {})
    commands = [line.split()[1] for line in result.stdout.splitlines()
                if line.startswith("│ ") and len(line.split()) > 1]  # fmt: skip
    assert "cost" not in commands
    assert "analysis" not in result.stdout.lower()
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    description = next(
        line for line in pyproject.read_text().splitlines() if line.startswith("description")
    )
    assert "cost" not in description.lower()
