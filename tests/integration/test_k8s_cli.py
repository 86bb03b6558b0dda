"""`fleetserve k8s render` and `validate`, run as processes from the repository root: the
manifests on stdout, a verdict per Kubernetes version, and one `error:` line (exit 2) for bad
input, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from fleetserve.testing.stack import env_without_settings, fleetserve_argv
from tests.unit.chart_support import ROOT, VALUES_DIR, need_helm

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("helm")]
CPU = str(VALUES_DIR / "cpu-llamacpp.yaml")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetserve_argv("k8s", *args), capture_output=True, text=True, timeout=60, cwd=cwd,
        stdin=subprocess.DEVNULL, env=env_without_settings(), check=False,
    )  # fmt: skip


def test_render_prints_the_manifests() -> None:
    done = run("render", "-f", CPU, "-n", "llm", "--release", "demo",
               "--set", "gateway.hpa.maxReplicas=4")  # fmt: skip
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Deployment", "demo-fleetserve-gateway") in names
    assert ("Deployment", "demo-fleetserve-engine-smollm2") in names
    assert {o["metadata"].get("namespace", "llm") for o in objects} == {"llm"}
    (hpa,) = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["maxReplicas"] == 4


@pytest.mark.parametrize("kube_version", ["1.29", "1.37"])
def test_validate_passes_the_chart(kube_version: str) -> None:
    done = run("validate", "-f", str(VALUES_DIR / "gpu-vllm.yaml"), "--kube-version", kube_version)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"objects are valid for Kubernetes {kube_version}")


def test_validate_names_each_invalid_object_and_exits_1() -> None:
    # extraEnv entries are the user's own objects: the schema lets them through, Kubernetes not.
    done = run("validate", "-f", CPU, "--set", "modelDefaults.extraEnv[0].nam=X")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("invalid: Deployment/fleetserve-engine-smollm2: ")
    assert "'name' is a required property at spec.template.spec.containers.0.env" in lines[0]
    assert lines[-1].endswith("objects are not valid for Kubernetes 1.37")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(("validate", "--kube-version", "1.20"),
                     "--kube-version 1.20: not one of 1.29 to 1.37", id="old-kubernetes"),
        pytest.param(("render", "--chart", "nowhere"), "--chart nowhere: no Chart.yaml there",
                     id="no-chart"),
        pytest.param(("render", "--set", "gateway.port"), "--set gateway.port: expected key=value",
                     id="set-without-value"),
        pytest.param(("render",), "tenancy.auth=keys needs secrets.databaseUrl", id="no-stores"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(args: tuple[str, ...], words: str) -> None:
    done = run(*args)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert words in line
    assert done.stdout == ""


def test_help_has_an_example() -> None:
    for command in ("render", "validate"):
        done = run(command, "--help")
        assert done.returncode == 0
        assert f"Example: fleetserve k8s {command}" in done.stdout
