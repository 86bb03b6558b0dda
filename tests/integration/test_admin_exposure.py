"""The admin API is never open beyond loopback: a gateway (or `up`) bound to another address
needs an admin key to start, and then every /admin route asks for it as a bearer token.

The gateways here may bind 0.0.0.0, but the tests only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.testing.stack import Services, env_without_settings, fleetserve_argv, services

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 30.0
KEY = "sk-admin-test-key"
UPSTREAM = ("--model", "m", "--upstream", f"http://{LOOPBACK}:9")  # nothing listens there


@pytest.fixture
def started() -> Iterator[Services]:
    with services() as running:
        yield running


def admin_status(port: int, key: str | None = None, path: str = "/admin/fleet") -> int:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetserve_argv(*args), capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL, env=env or env_without_settings(), check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("gateway", *UPSTREAM), id="gateway"),
        # an engine not installed here: the check must come before anything starts
        pytest.param(("up", "--engine", "vllm", "--model", "m"), id="up"),
    ],
)
def test_a_non_loopback_bind_without_a_key_refuses_to_start(command: tuple[str, ...]) -> None:
    result = run(*command, "--host", "0.0.0.0", "--port", str(free_port()))
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "0.0.0.0" in lines[0]
    assert "--admin-key-file" in lines[0]
    assert "FLEETSERVE_ADMIN_KEY" in lines[0]
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param(None, "cannot read the admin key file", id="missing"),
        pytest.param("\n", "is empty", id="empty"),
    ],
)
def test_a_bad_key_file_is_one_line(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "admin-key"
    if content is not None:
        path.write_text(content)
    result = run("gateway", *UPSTREAM, "--port", str(free_port()), "--admin-key-file", str(path))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]
    assert result.returncode == 2


@pytest.mark.parametrize("source", ["file-flag", "file-env", "env"])
def test_with_a_key_it_starts_and_admin_routes_need_it(
    started: Services, tmp_path: Path, source: str
) -> None:
    path = tmp_path / "admin-key"
    path.write_text(KEY + "\n")  # as `echo KEY > file` writes it
    port = free_port()
    args = ["gateway", *UPSTREAM, "--host", "0.0.0.0", "--port", str(port)]
    env = env_without_settings()
    if source == "file-flag":
        args += ["--admin-key-file", str(path)]
    elif source == "file-env":
        env["FLEETSERVE_ADMIN_KEY_FILE"] = str(path)
    else:
        env["FLEETSERVE_ADMIN_KEY"] = KEY
    service = started.start("gateway", fleetserve_argv(*args), port, env)
    service.wait_ok("/health", START_TIMEOUT_S)
    assert admin_status(port) == 401
    assert admin_status(port, "wrong") == 401
    assert admin_status(port, KEY) == 200
    assert admin_status(port, KEY, "/admin/load") == 200
    log = service.process.log_text()
    assert "admin API: key required" in log
    assert KEY not in log

    if source == "file-flag":  # `status` reads the same kind of key file
        url = f"http://{LOOPBACK}:{port}"
        denied = run("status", "--url", url)
        assert denied.returncode == 2
        assert "needs the admin key" in denied.stderr
        shown = run("status", "--url", url, "--admin-key-file", str(path))
        assert shown.returncode == 0, shown.stderr
        assert "replica-0" in shown.stdout


def test_on_loopback_the_admin_api_is_open_and_the_banner_says_so(started: Services) -> None:
    port = free_port()
    argv = fleetserve_argv("gateway", *UPSTREAM, "--port", str(port))
    service = started.start("gateway", argv, port, env_without_settings())
    service.wait_ok("/health", START_TIMEOUT_S)
    assert admin_status(port) == 200
    log = service.process.log_text()
    assert "admin API: open on loopback (no admin key); set --admin-key or FLEETSERVE_ADMIN_KEY" \
        in log  # fmt: skip
