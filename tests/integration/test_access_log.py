"""`fleetserve gateway --log-format json` as a process: every line it writes is one JSON
object, each /v1 request has one access line with its fields, the X-Request-ID it answers
with is the one in its line, and no API key (valid or not) ever appears in the log.

Tenancy is on (auth keys, SQLite in a temporary state directory) so that real keys pass
through the gateway; a sim engine process serves."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import (
    env_without_settings,
    fleetserve_argv,
    services,
    sim_engine_argv,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MODEL = "sim-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}
BOGUS_KEY = "fs-abcdefgh-thisisnotavalidsecretatall0123456789"
ACCESS_FIELDS = {"timestamp", "level", "logger", "event", "request_id", "trace_id", "tenant",
                 "model", "path", "stream", "replica", "attempts", "status", "error",
                 "input_tokens", "output_tokens", "ttft_ms", "e2e_ms", "bytes"}  # fmt: skip


def test_json_logs_have_one_access_line_per_request_and_never_a_key(tmp_path: Path) -> None:
    with services() as started:
        engine_port, port = free_port(), free_port()
        engine = started.start(
            "engine", sim_engine_argv(engine_port, MODEL, "instant", ["--cold-start-s", "0"]),
            engine_port,
        )  # fmt: skip
        engine.wait_ok("/health")
        argv = fleetserve_argv(
            "gateway", "--port", str(port), "--model", MODEL, "--engine", "sim",
            "--upstream", engine.url, "--auth", "keys", "--log-format", "json",
        )  # fmt: skip
        env = {"FLEETSERVE_STATE_DIR": str(tmp_path / "state"), "FLEETSERVE_LOG_LEVEL": "info"}
        gateway = started.start("gateway", argv, port, env)
        gateway.wait_ok("/ready")
        url = gateway.url
        httpx.post(url + "/admin/tenants", json={"name": "acme"}, timeout=10).raise_for_status()
        answer = httpx.post(url + "/admin/keys", json={"tenant": "acme"}, timeout=10)
        answer.raise_for_status()
        key = str(answer.json()["key"])
        auth = {"Authorization": f"Bearer {key}"}
        chat = url + "/v1/chat/completions"
        plain = httpx.post(chat, json=CHAT, headers=auth, timeout=10)
        stream = httpx.post(chat, json={**CHAT, "stream": True}, headers=auth, timeout=10)
        refused = httpx.post(chat, json=CHAT, headers={"Authorization": f"Bearer {BOGUS_KEY}"},
                             timeout=10)  # fmt: skip
        assert (plain.status_code, stream.status_code, refused.status_code) == (200, 200, 401)
        gateway.process.stop()  # the last lines are written at shutdown at the latest
        text = gateway.process.log_path.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # each is JSON
    assert all(isinstance(line, dict) for line in lines)
    assert {"timestamp", "level", "event"} <= set(lines[0])  # the banner too
    access = [line for line in lines if line.get("logger") == "fleetserve.access"]
    assert len(access) == 3
    assert all(set(line) == ACCESS_FIELDS for line in access)
    by_id = {line["request_id"]: line for line in access}
    for response, stream_flag in ((plain, False), (stream, True)):
        line = by_id[response.headers["x-request-id"]]
        assert line["tenant"] == "acme"
        assert line["model"] == MODEL
        assert line["status"] == 200
        assert line["stream"] is stream_flag
        assert line["replica"] == f"127.0.0.1:{engine_port}"
        assert line["output_tokens"] == 5
        assert isinstance(line["input_tokens"], int)
        assert line["e2e_ms"] > 0
        assert line["bytes"] == len(response.content)
    assert by_id[stream.headers["x-request-id"]]["ttft_ms"] > 0
    (rejected,) = [line for line in access if line["status"] == 401]
    assert rejected["tenant"] is None
    secret = key.rsplit("-", 1)[1]
    for needle in (key, secret, BOGUS_KEY, BOGUS_KEY.rsplit("-", 1)[1]):
        assert needle not in text
    assert "Say hi." not in text  # nor a prompt


def test_log_format_is_checked_and_documented() -> None:
    env = env_without_settings()
    bad = subprocess.run(
        fleetserve_argv("gateway", "--log-format", "xml", "--model", "m", "--upstream",
                        "http://127.0.0.1:9"),
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "invalid --log-format: 'xml'" in bad.stderr
    for command in ("gateway", "up"):
        shown = subprocess.run(
            fleetserve_argv(command, "--help"), capture_output=True, text=True, timeout=30,
            env=env, check=True,
        )  # fmt: skip
        assert "--log-format" in shown.stdout
        assert "--access-log" in shown.stdout
        assert f"fleetserve {command} " in shown.stdout
        assert "--log-format json" in shown.stdout  # the example in the command's help
