"""`fleetserve tenants`, `keys` and `usage` as processes, against the database (SQLite in a
temporary state directory) and against a running gateway's admin API (`--url`)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import FAST_HEALTH_ENV, Service, fleetserve_argv, services

pytestmark = pytest.mark.integration


def _run(state: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETSERVE_STATE_DIR": str(state)}
    env.pop("FLEETSERVE_DATABASE_URL", None)
    done = subprocess.run(
        fleetserve_argv(*args), capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_tenants_and_keys_against_the_database(tmp_path: Path) -> None:
    _run(tmp_path, "tenants", "create", "research", "--rpm", "600", "--budget-usd", "50",
         "--budget-period", "day", "--priority", "interactive", "--models", "a,b")  # fmt: skip
    listed = json.loads(_run(tmp_path, "tenants", "list", "--json").stdout)
    assert listed[0]["name"] == "research"
    assert listed[0]["budget"] == {"usd": 50.0, "period": "day", "soft_alert_frac": 0.8}
    assert listed[0]["models"] == ["a", "b"]
    _run(tmp_path, "tenants", "update", "research", "--rpm", "none", "--weight", "2")
    shown = json.loads(_run(tmp_path, "tenants", "show", "research").stdout)
    assert (shown["rpm"], shown["weight"]) == (None, 2.0)

    created = _run(tmp_path, "keys", "create", "--tenant", "research", "--expires", "30d")
    token = created.stdout.strip()
    assert token.startswith("fs-")
    assert len(token) >= 3 + 8 + 1 + 32
    assert token not in created.stderr
    keys = json.loads(_run(tmp_path, "keys", "list", "--json").stdout)
    assert [k["state"] for k in keys] == ["active"]
    assert token not in json.dumps(keys)  # listings never hold the secret
    prefix = keys[0]["id"]
    rotated = _run(tmp_path, "keys", "rotate", prefix, "--grace", "1h").stdout.strip()
    assert rotated.startswith("fs-")
    assert rotated != token
    _run(tmp_path, "keys", "revoke", prefix)
    states = {
        k["id"]: k["state"] for k in json.loads(_run(tmp_path, "keys", "list", "--json").stdout)
    }
    assert states[prefix] == "revoked"
    db = (tmp_path / "fleetserve.db").read_bytes()
    assert token.encode() not in db
    assert rotated.encode() not in db

    usage = _run(tmp_path, "usage", "--since", "1h", "--format", "csv").stdout
    assert usage.splitlines()[0].startswith("group,requests,errors")
    _run(tmp_path, "tenants", "delete", "research")
    assert json.loads(_run(tmp_path, "tenants", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    "args",
    [
        ("tenants", "create", "bad name"),
        ("tenants", "create", "x", "--rpm", "lots"),
        ("tenants", "create", "x", "--priority", "urgent"),
        ("keys", "create", "--tenant", "x", "--expires", "soon"),
        ("usage", "--by", "color"),
        ("usage", "--since", "yesterday"),
    ],
)
def test_bad_values_are_one_line_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = _run(tmp_path, *args, ok=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_things_are_one_line_exit_1(tmp_path: Path) -> None:
    for args in (("tenants", "show", "nobody"), ("keys", "create", "--tenant", "nobody"),
                 ("keys", "revoke", "fs-AAAAAAAA")):  # fmt: skip
        done = _run(tmp_path, *args, ok=False)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Service]:
    with services() as started:
        port = free_port()
        engine = started.start(
            "engine", fleetserve_argv("engine", "sim", "--port", str(port), "--model", "m",
                                      "--profile", "instant", "--cold-start-s", "0"), port,
        )  # fmt: skip
        engine.wait_ok("/health")
        gport = free_port()
        argv = fleetserve_argv("gateway", "--port", str(gport), "--model", "m", "--engine", "sim",
                               "--upstream", engine.url, "--auth", "keys",
                               "--admin-key", "adm-secret")  # fmt: skip
        env = {**FAST_HEALTH_ENV, "FLEETSERVE_STATE_DIR": str(tmp_path / "gw")}
        service = started.start("gateway", argv, gport, env)
        service.wait_ok("/ready")
        yield service


def test_the_same_commands_against_a_gateway(tmp_path: Path, gateway: Service) -> None:
    remote = ("--url", gateway.url, "--admin-key", "adm-secret")
    _run(tmp_path, "tenants", "create", "ops", "--tpm", "1000", *remote)
    token = _run(tmp_path, "keys", "create", "--tenant", "ops", *remote).stdout.strip()
    assert token.startswith("fs-")
    keys = json.loads(_run(tmp_path, "keys", "list", "--json", *remote).stdout)
    assert [k["tenant"] for k in keys] == ["ops"]
    assert not (tmp_path / "fleetserve.db").exists()  # it went to the gateway's database
    denied = _run(tmp_path, "tenants", "list", "--url", gateway.url, "--admin-key", "wrong",
                  ok=False)  # fmt: skip
    assert denied.returncode == 1
    assert "admin key" in denied.stderr
