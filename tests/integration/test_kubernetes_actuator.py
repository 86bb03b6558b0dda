"""KubernetesActuator against a mock API server (kmock on 127.0.0.1): the exact PATCH of the
scale subresource, the GET behind current(), and each API failure as one clear ActuatorError."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from kmock import RawHandler, Server, headers
from lightkube import AsyncClient, KubeConfig

from fleetserve.errors import ActuatorError
from fleetserve.fleet.kubernetes import KubernetesActuator, KubernetesTarget
from fleetserve.fleet.processes import LOOPBACK, free_port

pytestmark = pytest.mark.integration

NS, NAME = "prod", "llm"
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}/scale"


def kubeconfig(server: str, namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mock", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": "sekret"}}],
        "contexts": [
            {"name": "mock", "context": {"cluster": "mock", "user": "me", "namespace": namespace}}
        ],
        "current-context": "mock",
    }


def scale(spec_replicas: int | None, status_replicas: int = 0) -> dict[str, Any]:
    spec = {} if spec_replicas is None else {"replicas": spec_replicas}
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": spec,
        "status": {"replicas": status_replicas, "selector": "app=llm"},
    }


def status(code: int, reason: str, message: str) -> bytes:
    return orjson.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
         "reason": reason, "code": code}
    )  # fmt: skip


@pytest.fixture
async def api() -> AsyncIterator[tuple[RawHandler, str]]:
    async with RawHandler() as handler, Server(handler) as server:
        yield handler, str(server.url).rstrip("/")


def actuator(server: str, namespace: str | None = NS) -> KubernetesActuator:
    client = AsyncClient(
        config=KubeConfig.from_dict(kubeconfig(server)), field_manager="fleetserve"
    )
    return KubernetesActuator(client, KubernetesTarget(NAME, namespace))


@pytest.mark.parametrize("replicas", [3, 0])
async def test_set_replicas_sends_the_exact_merge_patch(
    api: tuple[RawHandler, str], replicas: int
) -> None:
    handler, url = api
    handler[f"patch {SCALE_PATH}"] << (lambda req: scale(req.data["spec"]["replicas"]))
    k8s = actuator(url)
    try:
        await k8s.set_replicas(replicas)
    finally:
        await k8s.close()
    (request,) = list(handler)
    assert request.method == "PATCH"
    assert request.url.path == SCALE_PATH
    assert dict(request.params) == {"fieldManager": "fleetserve"}
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    assert request.headers["Authorization"] == "Bearer sekret"
    assert request.body == b'{"spec":{"replicas":%d}}' % replicas


@pytest.mark.parametrize(
    ("spec_replicas", "expected"),
    [pytest.param(4, 4, id="four"), pytest.param(None, 0, id="zero-is-omitted")],
)
async def test_current_reads_spec_replicas(
    api: tuple[RawHandler, str], spec_replicas: int | None, expected: int
) -> None:
    handler, url = api
    handler[f"get {SCALE_PATH}"] << scale(spec_replicas, status_replicas=5)
    k8s = actuator(url)
    try:
        assert await k8s.current() == expected
        described = await k8s.describe()
    finally:
        await k8s.close()
    assert (described.kind, described.target) == ("kubernetes", f"deployment {NS}/{NAME}")
    assert (described.desired, described.current, described.observed) == (expected, expected, 5)
    assert [(r.method, r.url.path) for r in handler] == [("GET", SCALE_PATH)] * 2


async def test_namespace_comes_from_the_kubeconfig_when_not_given(
    api: tuple[RawHandler, str],
) -> None:
    handler, url = api
    handler[f"get {SCALE_PATH}"] << scale(2)
    k8s = actuator(url, namespace=None)
    try:
        assert await k8s.current() == 2
    finally:
        await k8s.close()


async def test_connect_reads_a_kubeconfig_file(api: tuple[RawHandler, str], tmp_path: Path) -> None:
    handler, url = api
    handler[f"get {SCALE_PATH}"] << scale(1)
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(kubeconfig(url)))
    k8s = KubernetesActuator.connect(KubernetesTarget(NAME, NS), kubeconfig=path)
    try:
        assert await k8s.current() == 1
    finally:
        await k8s.close()


def test_connect_names_a_missing_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(ActuatorError, match=r"cannot load a Kubernetes configuration from .*nope"):
        KubernetesActuator.connect(KubernetesTarget(NAME, NS), kubeconfig=tmp_path / "nope")


JSON: headers[str] = headers(
    {"Content-Type": "application/json"}
)  # exactly as the API server answers


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        pytest.param(
            404, status(404, "NotFound", 'deployments.apps "llm" not found'),
            r'^deployment prod/llm not found \(Kubernetes API: deployments.apps "llm" not found\)$',
            id="404",
        ),
        pytest.param(
            403, status(403, "Forbidden", "cannot patch resource deployments/scale"),
            r"^not allowed to scale deployment prod/llm to 3: cannot patch resource "
            r"deployments/scale; the service account or user needs the verbs get and patch on "
            r"deployments/scale in namespace prod$",
            id="403",
        ),
        pytest.param(
            401, status(401, "Unauthorized", "Unauthorized"),
            r"^the Kubernetes API did not accept the credentials to scale deployment prod/llm to 3",
            id="401",
        ),
        pytest.param(
            422, status(422, "Invalid", "spec.replicas: Invalid value: -1"),
            r"^the Kubernetes API refused to scale deployment prod/llm to 3: HTTP 422: "
            r"spec.replicas: Invalid value: -1$",
            id="422",
        ),
    ],
)  # fmt: skip
async def test_api_errors_name_the_deployment(
    api: tuple[RawHandler, str], code: int, body: bytes, expected: str
) -> None:
    handler, url = api
    handler[f"patch {SCALE_PATH}"] << code << JSON << body
    k8s = actuator(url)
    try:
        with pytest.raises(ActuatorError, match=expected):
            await k8s.set_replicas(3)
    finally:
        await k8s.close()


async def test_an_error_that_is_not_a_status_still_reads_clearly(
    api: tuple[RawHandler, str],
) -> None:
    handler, url = api
    handler[f"get {SCALE_PATH}"] << 502 << headers({"Content-Type": "text/plain"}) << b"bad gateway"
    k8s = actuator(url)
    try:
        with pytest.raises(
            ActuatorError, match=r"refused to read the scale of .*HTTP 502: bad gateway"
        ):
            await k8s.current()
    finally:
        await k8s.close()


async def test_an_unreachable_api_names_the_server_and_the_deployment() -> None:
    server = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    k8s = actuator(server)
    try:
        with pytest.raises(ActuatorError) as caught:
            await k8s.set_replicas(2)
    finally:
        await k8s.close()
    assert str(caught.value).startswith(
        f"cannot reach the Kubernetes API at {server} to scale deployment prod/llm to 2: "
    )
