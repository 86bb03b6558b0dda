"""The chart's rendered objects, over the matrix of values files in tests/fixtures/chart/:
restricted Pod Security on every pod, probes sized for cold starts, drain grace, least-privilege
RBAC, a NetworkPolicy for every pod, the gateway's PDB and HPA, the engines' headless Services
and caches, and the fleet file that the gateway and autoscaler read (checked by fleetserve's own
FleetFile model)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fleetserve.config import FleetFile
from tests.unit.chart_support import (
    MATRIX,
    NAMESPACE,
    RELEASE,
    Rendered,
    labels_match,
    models_of,
    need_helm,
    rendered,
    values_of,
)

# Pod Security Standards, "restricted" profile: the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
FULL = f"{RELEASE}-fleetserve"

pytestmark = pytest.mark.usefixtures("helm")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


@pytest.fixture(params=MATRIX)
def chart(request: pytest.FixtureRequest) -> Rendered:
    return rendered(request.param)


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_pod_meets_the_restricted_profile(chart: Rendered) -> None:
    pods = list(chart.pods())
    assert pods, chart.name
    for workload, pod in pods:
        where = f"{chart.name}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] != 0, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), where
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {volume}"
        for container in _containers(pod):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("runAsNonRoot", pod_sc["runAsNonRoot"]) is True, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            # A read-only root needs a writable /tmp.
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
            assert not any(p.get("hostPort") for p in container.get("ports", [])), where


def test_service_account_tokens_only_where_the_api_is_used(chart: Rendered) -> None:
    bound = {b["subjects"][0]["name"] for b in chart.of_kind("RoleBinding")}
    for account in chart.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]
    for workload, pod in chart.pods():
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not False:
            assert spec["serviceAccountName"] in bound, workload["metadata"]["name"]
    for _, pod in _engine_pods(chart):
        assert pod["spec"]["automountServiceAccountToken"] is False


def _engine_pods(chart: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (w, p)
        for w, p in chart.pods()
        if p["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"
    ]


def test_every_container_has_readiness_and_liveness(chart: Rendered) -> None:
    for workload, pod in chart.pods():
        for container in pod["spec"]["containers"]:
            where = f"{chart.name}: {workload['metadata']['name']}/{container['name']}"
            assert container["readinessProbe"], where
            assert container["livenessProbe"], where


def test_engine_startup_budget_and_drain_grace(chart: Rendered) -> None:
    models = {m["name"]: m for m in models_of(chart.name)}
    assert len(_engine_pods(chart)) == len(models)
    for workload, pod in _engine_pods(chart):
        model = models[pod["metadata"]["labels"]["fleetserve.dev/model"]]
        (engine,) = pod["spec"]["containers"]
        startup = engine["startupProbe"]
        # The startup probe allows the whole budget before liveness can restart the pod.
        assert (
            startup["periodSeconds"] * startup["failureThreshold"] >= model["startupBudgetSeconds"]
        ), workload["metadata"]["name"]
        assert model["startupBudgetSeconds"] >= 1800 or chart.name != "defaults"
        # Liveness gives a busy engine at least 30 s before a restart.
        live = engine["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30
        # The preStop waits for the drain; the kubelet must not kill it before.
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert grace >= model["drainGraceSeconds"] + model["endpointDelaySeconds"]
        pre_stop = engine["lifecycle"]["preStop"]["exec"]["command"]
        assert str(model["drainGraceSeconds"]) in pre_stop[-1]
        assert engine["ports"][0]["name"] == "http"


def test_engine_resources_images_and_scheduling(chart: Rendered) -> None:
    models = {m["name"]: m for m in models_of(chart.name)}
    values = values_of(chart.name)
    for _, pod in _engine_pods(chart):
        model = models[pod["metadata"]["labels"]["fleetserve.dev/model"]]
        (engine,) = pod["spec"]["containers"]
        image = values["engines"][model["engine"]]["image"]
        assert engine["image"] == f"{image['repository']}:{image['tag']}"
        assert image["tag"] not in {"", "latest"}
        limits = engine["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu", 0) == model["gpus"]
        assert pod["spec"].get("nodeSelector", {}) == model["nodeSelector"]
        assert pod["spec"].get("tolerations", []) == model["tolerations"]
        assert pod["spec"].get("priorityClassName", "") == model["priorityClassName"]
        if model["topologySpread"]:
            keys = {c["topologyKey"] for c in pod["spec"]["topologySpreadConstraints"]}
            assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        if model["engine"] == "vllm":
            shm = [v for v in pod["spec"]["volumes"] if v["name"] == "shm"]
            assert shm[0]["emptyDir"]["medium"] == "Memory"


def test_model_caches_never_share_a_read_write_once_claim(chart: Rendered) -> None:
    claims = {c["metadata"]["name"]: c for c in chart.of_kind("PersistentVolumeClaim")}
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]
    models = {m["name"]: m for m in models_of(chart.name)}
    for _, pod in _engine_pods(chart):
        model = models[pod["metadata"]["labels"]["fleetserve.dev/model"]]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "models"]
        kind = model["cache"]["type"]
        if kind == "emptyDir":
            assert "emptyDir" in volume
        elif kind == "readWriteMany":
            assert volume["persistentVolumeClaim"]["claimName"] in claims
        else:
            assert volume["persistentVolumeClaim"]["claimName"] == model["cache"]["claimName"]


def test_headless_services_are_what_the_fleet_file_discovers(chart: Rendered) -> None:
    (config_map,) = [
        c for c in chart.of_kind("ConfigMap") if c["metadata"]["name"] == f"{FULL}-fleet"
    ]
    fleet = FleetFile.model_validate(yaml.safe_load(config_map["data"]["fleet.yaml"]))
    pods = {p["metadata"]["labels"]["fleetserve.dev/model"]: p for _, p in _engine_pods(chart)}
    assert {m.name for m in fleet.models} == set(pods)
    for spec in fleet.models:
        assert spec.discovery is not None
        found = spec.discovery.kubernetes
        assert found.namespace == NAMESPACE
        service = chart.one("Service", found.service)
        assert service["spec"]["clusterIP"] == "None"
        assert [p["name"] for p in service["spec"]["ports"]] == [found.port]
        assert labels_match(service["spec"]["selector"], pods[spec.name]["metadata"]["labels"])
        others = [p for m, p in pods.items() if m != spec.name]
        assert not any(
            labels_match(service["spec"]["selector"], p["metadata"]["labels"]) for p in others
        )
    grace = fleet.gateway["shutdown_grace_s"] if fleet.gateway else 0
    gateway = chart.one("Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] >= grace


def test_gateway_is_replicated_and_disruption_bounded(chart: Rendered) -> None:
    deployment = chart.one("Deployment", f"{FULL}-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpas = chart.of_kind("HorizontalPodAutoscaler")
    if hpas:
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert deployment["spec"]["replicas"] >= 2
    (pdb,) = chart.of_kind("PodDisruptionBudget")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    keys = {
        c["topologyKey"]
        for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    }
    assert "topology.kubernetes.io/zone" in keys
    service = chart.one("Service", f"{FULL}-gateway")
    assert labels_match(service["spec"]["selector"], labels)


def test_rbac_is_namespaced_named_and_without_wildcards(chart: Rendered) -> None:
    assert not chart.of_kind("ClusterRole")
    assert not chart.of_kind("ClusterRoleBinding")
    for role in chart.of_kind("Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"
            assert set(rule["verbs"]) <= {"get", "list", "watch", "patch"}
    autoscaled = [
        m["name"]
        for m in models_of(chart.name)
        if m["autoscale"] and values_of(chart.name)["autoscaler"]["mode"] == "fleetserve"
    ]
    roles = {r["metadata"]["name"]: r for r in chart.of_kind("Role")}
    if not autoscaled:
        assert f"{FULL}-autoscaler" not in roles
        return
    rules = roles[f"{FULL}-autoscaler"]["rules"]
    (scale,) = [r for r in rules if r["resources"] == ["deployments/scale"]]
    assert sorted(scale["verbs"]) == ["get", "patch"]
    assert sorted(scale["resourceNames"]) == sorted(f"{FULL}-engine-{m}" for m in autoscaled)
    (slices,) = [r for r in rules if r["resources"] == ["endpointslices"]]
    assert sorted(slices["verbs"]) == ["list", "watch"]
    # One container per autoscaled model, each aimed at that model's Deployment.
    pod = chart.one("Deployment", f"{FULL}-autoscaler")["spec"]["template"]["spec"]
    targets = sorted(
        a.split("=", 1)[1]
        for c in pod["containers"]
        for a in c["args"]
        if a.startswith("--deployment=")
    )
    assert targets == sorted(scale["resourceNames"])
    for name in targets:  # fleetserve scales them: Helm must not reset their replicas
        assert "replicas" not in chart.one("Deployment", name)["spec"]


def test_every_pod_is_selected_by_a_network_policy(chart: Rendered) -> None:
    policies = chart.of_kind("NetworkPolicy")
    if not values_of(chart.name)["networkPolicy"]["enabled"]:
        assert not policies
        return
    for policy in policies:
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    for workload, pod in chart.pods():
        labels = pod["metadata"]["labels"]
        selecting = [
            p for p in policies if labels_match(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert selecting, f"{chart.name}: no NetworkPolicy selects {workload['metadata']['name']}"


def test_engines_accept_only_the_gateway_and_prometheus(chart: Rendered) -> None:
    if not values_of(chart.name)["networkPolicy"]["enabled"]:
        return
    policy = chart.one("NetworkPolicy", f"{FULL}-engine")
    (rule,) = policy["spec"]["ingress"]
    prometheus = values_of(chart.name)["networkPolicy"]["prometheusFrom"]
    gateway = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "fleetserve",
                "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/component": "gateway",
            }
        }
    }
    assert rule["from"] == [gateway, *prometheus]


def test_monitoring_objects_follow_their_switches(chart: Rendered) -> None:
    monitoring = values_of(chart.name)["monitoring"]
    kinds = {o["kind"] for o in chart.objects}
    assert ("ServiceMonitor" in kinds) == monitoring["serviceMonitor"]["enabled"]
    assert ("PrometheusRule" in kinds) == monitoring["prometheusRule"]["enabled"]
    dashboards = [
        c for c in chart.of_kind("ConfigMap") if c["metadata"]["name"] == f"{FULL}-dashboard"
    ]
    assert bool(dashboards) == monitoring["dashboard"]["enabled"]
