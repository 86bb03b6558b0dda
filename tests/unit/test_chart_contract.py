"""What the chart passes to fleetserve is what fleetserve accepts (a chart that passes a flag the
program rejects is a peer's bug, production-stack #746): every fleetserve container's arguments
parse with the real CLI, and the gateway's environment, fleet file and secret files build the
real GatewaySettings with the values the chart meant."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from fleetserve.cli.main import app
from fleetserve.config.resolve import gateway_settings
from tests.unit.chart_support import MATRIX, RELEASE, need_helm, rendered, values_of

FULL = f"{RELEASE}-fleetserve"

pytestmark = pytest.mark.usefixtures("helm")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


def _fleetserve_containers(name: str) -> list[dict[str, Any]]:
    out = []
    for obj in rendered(name).objects:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("fleetserve:"):
                out.append(container)
    return out


@pytest.mark.parametrize("name", MATRIX)
def test_every_fleetserve_container_passes_arguments_the_cli_accepts(name: str) -> None:
    group = typer.main.get_command(app)
    containers = _fleetserve_containers(name)
    assert {c["args"][0] for c in containers} >= {"gateway"}
    for container in containers:
        command = group.commands[container["args"][0]]  # type: ignore[attr-defined]
        # Parses and type-checks every option, as a run would, without running the command.
        with command.make_context(container["args"][0], list(container["args"][1:])) as ctx:
            assert ctx.params


@pytest.mark.parametrize("name", ["cpu-llamacpp", "open-no-autoscaler", "bundled-stores"])
def test_the_gateway_pod_builds_the_settings_the_chart_meant(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered(name).objects
    fleet_map = next(o for o in objects if o["metadata"]["name"] == f"{FULL}-fleet")
    secrets = [o for o in objects if o["kind"] == "Secret"]
    data = {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()}
    (container,) = next(
        o
        for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{FULL}-gateway"
    )["spec"]["template"]["spec"]["containers"]
    # The pod's files: the fleet file and the admin key, where the arguments say they are.
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(fleet_map["data"]["fleet.yaml"])
    key_file = tmp_path / "admin-key"
    key_file.write_text(data["admin-key"])
    env: list[tuple[str, str]] = []
    for var in container["env"]:
        if "value" in var:
            value = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["key"] not in data:
                assert ref.get("optional") is True, ref
                continue
            value = data[ref["key"]]
        env.append((var["name"], value))
    for inherited in [k for k in os.environ if k.startswith(("FLEETSERVE_", "OTEL_"))]:
        monkeypatch.delenv(inherited)  # the pod has only its own environment
    for var in env:
        monkeypatch.setenv(*var)
    monkeypatch.setenv("FLEETSERVE_STATE_DIR", str(tmp_path / "state"))
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"][1:])
    settings = gateway_settings(
        {"fleet_file": fleet_file, "admin_key_file": key_file, "host": args["host"],
         "port": int(args["port"]), "workers": int(args["workers"])}
    )  # fmt: skip
    values = values_of(name)
    assert settings.admin_key_value() == data["admin-key"]
    assert settings.shutdown_grace_s == values["gateway"]["drainGraceSeconds"]
    assert settings.shutdown_delay_s == values["gateway"]["shutdownDelaySeconds"]
    tenancy = settings.tenancy
    pepper = tenancy.key_pepper
    assert pepper is not None
    assert pepper.get_secret_value() == data["key-pepper"]
    hpa = values["gateway"]["hpa"]
    most_pods = hpa["maxReplicas"] if hpa["enabled"] else values["gateway"]["replicas"]
    assert tenancy.gateway_processes == most_pods * values["gateway"]["workers"]
    if "database-url" in data:
        assert tenancy.database_url is not None
        assert tenancy.database_url.get_secret_value() == data["database-url"]
        assert tenancy.redis_url is not None
    else:
        assert tenancy.database_url is None
    assert yaml.safe_load(fleet_map["data"]["fleet.yaml"])["models"]
