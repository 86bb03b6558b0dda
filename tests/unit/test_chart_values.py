"""The chart as a whole: `helm lint --strict` over the matrix, one version everywhere (package,
chart, appVersion, image tag), values.schema.json rejecting wrong types and unknown keys, the
gateway's secrets, and the monitoring objects carrying deploy/'s rules and dashboard."""

from __future__ import annotations

import base64
import json
import subprocess
import tomllib

import pytest
import yaml

import fleetserve
from fleetserve.deploy.helm import RenderSpec, lint
from fleetserve.errors import ConfigError
from tests.unit.chart_support import (
    CHART,
    MATRIX,
    RELEASE,
    ROOT,
    VALUES_DIR,
    need_helm,
    parse,
    rendered,
)

FULL = f"{RELEASE}-fleetserve"
URLS = (
    "secrets.databaseUrl=postgresql+asyncpg://u:p@db:5432/f",
    "secrets.redisUrl=redis://r:6379/0",
)

pytestmark = pytest.mark.usefixtures("helm")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


def _package_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_chart_version_app_version_and_image_tag_are_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = _package_version()
    assert chart["version"] == chart["appVersion"] == version == fleetserve.__version__
    shown = subprocess.run(
        ["make", "-s", "version"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert shown.stdout.strip() == version  # the tag `make image` gives the image
    objects = rendered("cpu-llamacpp").objects
    images = {
        c["image"]
        for o in objects
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
        if o["metadata"]["labels"]["app.kubernetes.io/component"] != "engine"
    }
    assert images == {f"fleetserve:{version}"}


@pytest.mark.parametrize("name", MATRIX)
def test_lint_strict_passes(name: str) -> None:
    report = lint(RenderSpec(CHART, [VALUES_DIR / f"{name}.yaml"]))
    assert "0 chart(s) failed" in report


@pytest.mark.parametrize(
    ("assignment", "complaint"),
    [
        pytest.param(
            "gateway.port=eighty", "at '/gateway/port': got string, want integer", id="wrong-type"
        ),
        pytest.param(
            "gateway.replicaz=3", "additional properties 'replicaz' not allowed", id="unknown-key"
        ),
        pytest.param(
            "models[0].engin=vllm",
            "additional properties 'engin' not allowed",
            id="unknown-model-key",
        ),
        pytest.param("models[0].engine=tgi", "/models/0/engine", id="unknown-engine"),
        pytest.param("engines.vllm.image.tag=latest", "/engines/vllm/image/tag", id="latest-tag"),
        pytest.param("gateway.replicas=1", "/gateway/replicas", id="one-gateway"),
        pytest.param(
            "modelDefaults.cache.type=readWriteOnce", "/modelDefaults/cache/type", id="rwo-cache"
        ),
    ],
)
def test_the_schema_rejects(assignment: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rendered("cpu-llamacpp", assignment)
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_keys_without_shared_stores_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as caught:
        rendered("defaults")
    assert "tenancy.auth=keys needs secrets.databaseUrl and secrets.redisUrl" in str(caught.value)


def _secret(objects: tuple[dict[str, object], ...]) -> dict[str, str]:
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    data = secret["data"]
    assert isinstance(data, dict)
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def test_secrets_are_generated_when_absent_and_taken_when_given() -> None:
    first, second = (
        _secret(rendered("defaults", *URLS).objects),
        _secret(rendered("defaults", *URLS, "nameOverride=fleetserve").objects),
    )
    assert len(first["admin-key"]) == 40
    assert len(first["key-pepper"]) == 40
    assert first["admin-key"] != second["admin-key"]  # random each time nothing is stored
    assert first["database-url"] == "postgresql+asyncpg://u:p@db:5432/f"
    given = _secret(rendered("defaults", *URLS, "secrets.adminKey=s3cret-admin").objects)
    assert given["admin-key"] == "s3cret-admin"


def test_bundled_stores_and_the_gateway_read_one_password() -> None:
    objects = rendered("bundled-stores").objects
    data = _secret(objects)
    pg_password, redis_password = data["postgresql-password"], data["redis-password"]
    assert data["database-url"] == (
        f"postgresql+asyncpg://fleetserve:{pg_password}@{FULL}-postgresql.llm.svc:5432/fleetserve"
    )
    assert data["redis-url"] == f"redis://:{redis_password}@{FULL}-redis.llm.svc:6379/0"
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    assert {f"{FULL}-postgresql", f"{FULL}-redis"} <= services
    for store, key in (("postgresql", "postgresql-password"), ("redis", "redis-password")):
        (sts,) = [
            o for o in objects if o["kind"] == "StatefulSet" and store in o["metadata"]["name"]
        ]
        env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = [e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e]
        assert {"name": f"{FULL}-gateway", "key": key} in refs
        (claim,) = sts["spec"]["volumeClaimTemplates"]  # one pod, its own claim
        assert sts["spec"]["replicas"] == 1
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        (policy,) = [
            o
            for o in objects
            if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == f"{FULL}-{store}"
        ]
        (rule,) = policy["spec"]["ingress"]
        assert [
            p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]
        ] == ["gateway"]
        assert policy["spec"]["egress"] == []


def test_bundled_stores_refuse_an_existing_secret() -> None:
    with pytest.raises(ConfigError, match=r"leave secrets\.existingSecret empty"):
        rendered("bundled-stores", "secrets.existingSecret=mine")


def test_existing_secret_replaces_the_charts_own() -> None:
    objects = rendered("gpu-vllm").objects
    assert not [o for o in objects if o["kind"] == "Secret"]
    gateway = next(
        o
        for o in objects
        if o["metadata"]["name"] == f"{FULL}-gateway" and o["kind"] == "Deployment"
    )
    pod = gateway["spec"]["template"]["spec"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in pod["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert refs == {"fleetserve-secrets"}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "secrets"]
    assert volume["secret"]["secretName"] == "fleetserve-secrets"


def test_prometheus_rule_and_dashboard_carry_the_shipped_files() -> None:
    objects = rendered("gpu-vllm").objects
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    assert rule["spec"] == shipped
    assert any(
        "{{ $labels.model }}" in r["annotations"]["summary"]
        for r in rule["spec"]["groups"][0]["rules"]
    )
    (board,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{FULL}-dashboard"
    ]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped_board = json.loads((ROOT / "deploy" / "grafana" / "fleetserve.json").read_text())
    assert json.loads(board["data"]["fleetserve.json"]) == shipped_board
    monitors = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceMonitor"}
    assert monitors == {f"{FULL}-gateway", f"{FULL}-engine"}


def test_parse_skips_empty_documents() -> None:
    assert parse("---\n# only a comment\n---\nkind: A\n") == ({"kind": "A"},)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_fleetserve_as_the_uid_the_chart_expects() -> None:
    """No builder can run here (README, design notes): the Dockerfile's own promises, then."""
    instructions = _dockerfile_instructions()
    stages = [args for word, args in instructions if word == "FROM"]
    assert len(stages) == 2  # build, then a runtime without the build tools
    final = instructions[[w for w, _ in instructions].index("FROM", 1) :]
    assert ("USER", "10001:10001") in final
    assert ("ENTRYPOINT", '["fleetserve"]') in final
    env = " ".join(args for word, args in final if word == "ENV")
    assert "FLEETSERVE_STATE_DIR=/var/lib/fleetserve" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    objects = rendered("cpu-llamacpp").objects
    for obj in objects:
        if obj["kind"] != "Deployment" or "engine" in obj["metadata"]["name"]:
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/var/lib/fleetserve", "/tmp"} <= mounts  # the image's only writable paths
