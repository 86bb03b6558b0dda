"""Settings reach the processes the CLI starts in the documented order: a flag, then the
environment (FLEETSERVE_*), then the fleet file's `gateway:` section, then the default.

Each test starts `fleetserve gateway` or `fleetserve up` as a user would and reads what the
running process took: the port it listens on and the load window its /admin/load reports.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson
import pytest

from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.testing.stack import (
    Service,
    Services,
    env_without_settings,
    fleetserve_argv,
    services,
)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 30.0
MODEL = "m"


@pytest.fixture
def started() -> Iterator[Services]:
    with services() as running:
        yield running


def gateway(started: Services, port: int, args: list[str], env: Mapping[str, str]) -> Service:
    """A gateway expected on `port`; fails (with its log) unless /health answers there."""
    upstream = f"http://{LOOPBACK}:{free_port()}"  # nothing listens: /health needs no replica
    argv = fleetserve_argv("gateway", *args)
    if "--fleet-file" not in args and "FLEETSERVE_FLEET_FILE" not in env:
        argv += ["--model", MODEL, "--upstream", upstream]
    service = started.start("gateway", argv, port, env)
    service.wait_ok("/health", START_TIMEOUT_S)
    return service


def load_window_s(service: Service) -> float:
    connection = http.client.HTTPConnection(LOOPBACK, service.port, timeout=5)
    try:
        connection.request("GET", "/admin/load")
        window = orjson.loads(connection.getresponse().read())["window_s"]
    finally:
        connection.close()
    assert isinstance(window, float | int)
    return float(window)


def write_fleet(tmp_path: Path, port: int, load_window_s: float) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"models: [{{name: {MODEL}, engine: sim, replicas: ['http://{LOOPBACK}:{free_port()}']}}]\n"
        f"gateway:\n  port: {port}\n  load_window_s: {load_window_s}\n"
        f"  timeouts: {{first_byte_s: 120}}\n"
    )
    return path


def test_the_environment_sets_what_no_flag_gives(started: Services) -> None:
    port = free_port()
    service = gateway(started, port, [], env_without_settings(FLEETSERVE_PORT=str(port),
                                                   FLEETSERVE_LOAD_WINDOW_S="7"))  # fmt: skip
    assert load_window_s(service) == 7.0


def test_a_flag_beats_the_environment(started: Services) -> None:
    port = free_port()
    env = env_without_settings(FLEETSERVE_PORT=str(free_port()))
    gateway(started, port, ["--port", str(port)], env)


def test_the_fleet_file_gateway_section_is_below_the_environment(
    started: Services, tmp_path: Path
) -> None:
    port = free_port()
    path = write_fleet(tmp_path, port, 9)
    service = gateway(started, port, ["--fleet-file", str(path)], env_without_settings())
    assert load_window_s(service) == 9.0


def test_the_environment_names_the_fleet_file_and_beats_its_values(
    started: Services, tmp_path: Path
) -> None:
    port = free_port()
    path = write_fleet(tmp_path, free_port(), 9)  # its port loses to FLEETSERVE_PORT
    env = env_without_settings(FLEETSERVE_FLEET_FILE=str(path), FLEETSERVE_PORT=str(port))
    service = gateway(started, port, [], env)
    assert load_window_s(service) == 9.0


@pytest.mark.timeout(90)
def test_up_takes_the_same_order(started: Services, tmp_path: Path) -> None:
    port = free_port()
    path = write_fleet(tmp_path, port, 9)  # up reads its gateway: section
    argv = fleetserve_argv(
        "up", "--engine", "sim", "--profile", "instant", "--cold-start-s", "0", "--replicas",
        "1", "--model", MODEL, "--fleet-file", str(path),
    )  # fmt: skip
    service = started.start("up", argv, port, env_without_settings(FLEETSERVE_LOAD_WINDOW_S="7"))
    service.wait_ok("/ready", START_TIMEOUT_S)
    assert load_window_s(service) == 7.0  # the environment over the fleet file
