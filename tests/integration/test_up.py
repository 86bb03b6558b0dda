"""`fleetserve up` as a user runs it: it serves, stops everything on SIGTERM, fails clearly."""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import psutil
import pytest
from openai import OpenAI

from fleetserve.fleet.processes import LOOPBACK, free_port, port_is_free
from fleetserve.testing.stack import Service, fleetserve_argv, services

pytestmark = pytest.mark.integration

MODEL = "sim-up"
READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 15.0


def up_argv(port: int) -> list[str]:
    return fleetserve_argv(
        "up", "--engine", "sim", "--replicas", "2", "--port", str(port),
        "--model", MODEL, "--profile", "instant",
    )  # fmt: skip


def get_json(url: str, path: str) -> dict[str, object]:
    connection = http.client.HTTPConnection(url.split("://", 1)[1], timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        data: dict[str, object] = orjson.loads(response.read())
        return data
    finally:
        connection.close()


def wait_serving(
    client: OpenAI, up: Service, children: list[psutil.Process], model: str = MODEL
) -> None:
    """Poll with a chat request until the gateway answers one (bounded), recording the
    children of `up` on the way so that they can be cleaned up whatever happens."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert up.process.running, f"`up` exited early:\n{up.process.log_text()}"
        with contextlib.suppress(psutil.NoSuchProcess):
            known = {c.pid for c in children}
            children.extend(
                c for c in psutil.Process(up.pid).children(recursive=True) if c.pid not in known
            )
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        except (openai.APIConnectionError, openai.APIStatusError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
        else:
            return


@contextlib.contextmanager
def reap_on_exit(children: list[psutil.Process]) -> Iterator[None]:
    """Whatever happens, SIGKILL recorded children of `up` left running (they run in their own
    process groups, out of reach of the stop of `up`'s group)."""
    try:
        yield
    finally:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running():
                    child.send_signal(signal.SIGKILL)


@pytest.mark.timeout(90)
def test_up_serves_then_stops_everything_on_sigterm() -> None:
    port = free_port()
    children: list[psutil.Process] = []
    with services() as started, reap_on_exit(children):
        up = started.start("up", up_argv(port), port)
        with OpenAI(base_url=up.url + "/v1", api_key="sk-test", max_retries=0, timeout=5) as c:
            wait_serving(c, up, children)
            assert [m.id for m in c.models.list().data] == [MODEL]
            stream = c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "stream please"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 6
        fleet = get_json(up.url, "/admin/fleet")
        replicas = fleet["replicas"]
        assert isinstance(replicas, list)
        engine_ports = [int(str(r["url"]).rsplit(":", 1)[1]) for r in replicas]
        assert len(engine_ports) == 2
        assert len(children) >= 2, children  # the two engines at least

        up.process.send_signal(signal.SIGTERM)
        try:
            code = up.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`up` still running {EXIT_TIMEOUT_S:g}s after SIGTERM")
        log = up.process.log_text()
        _, alive = psutil.wait_procs(children, timeout=2)
        outcome = f"`up` exited with status {code}; children still alive: {alive}\n{log}"
        assert not alive, outcome
        assert code == 0, outcome
        assert "Traceback" not in log, log
        for p in (port, *engine_ports):
            assert port_is_free(p), f"port {p} is still in use"


def test_up_on_a_busy_port_fails_with_one_clear_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            up_argv(port), capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"port {port}" in lines[0]
    assert "in use" in lines[0]


@pytest.mark.timeout(90)
def test_up_with_keys_makes_a_default_tenant_and_prints_its_key_once(tmp_path: Path) -> None:
    port = free_port()
    children: list[psutil.Process] = []
    env = {"FLEETSERVE_STATE_DIR": str(tmp_path)}
    argv = [*up_argv(port), "--auth", "keys"]
    with services() as started, reap_on_exit(children):
        up = started.start("up", argv, port, env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Authorization: Bearer fs-" not in up.process.log_text():
            assert up.process.running, up.process.log_text()
            assert time.monotonic() < deadline, up.process.log_text()
            time.sleep(0.1)
        found = re.search(r"Bearer (fs-[A-Za-z0-9]{8}-[A-Za-z0-9_-]+)", up.process.log_text())
        assert found is not None
        token = found.group(1)
        with OpenAI(base_url=up.url + "/v1", api_key=token, max_retries=0, timeout=5) as c:
            wait_serving(c, up, children)
        with (
            OpenAI(base_url=up.url + "/v1", api_key="sk-none", max_retries=0, timeout=5) as bad,
            pytest.raises(openai.AuthenticationError),
        ):
            bad.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(EXIT_TIMEOUT_S) == 0
    # a second run finds the tenant and shows no key (only its HMAC is stored)
    port = free_port()
    with services() as started, reap_on_exit(children):
        again = started.start("up", [*up_argv(port), "--auth", "keys"], port, env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "tenant `default` exists" not in again.process.log_text():
            assert again.process.running, again.process.log_text()
            assert time.monotonic() < deadline, again.process.log_text()
            time.sleep(0.1)
        assert token not in again.process.log_text()
        assert "$FLEETSERVE_API_KEY" in again.process.log_text()
