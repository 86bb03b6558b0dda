"""Every object the chart renders, over the matrix, is valid for Kubernetes 1.29 and 1.37
(kubernetes-validate's strict schemas: unknown fields are errors), and its prometheus-operator
objects are valid against their CRDs' schemas (src/fleetserve/deploy/crds, SOURCES.md there).
There is no API server here: admission, defaulting and the controllers are a real cluster's."""

from __future__ import annotations

import pytest

from fleetserve.deploy.validate import (
    KUBE_VERSIONS,
    Problem,
    check_version,
    crd_validators,
    validate,
)
from fleetserve.errors import ConfigError
from tests.unit.chart_support import MATRIX, need_helm, rendered

pytestmark = pytest.mark.usefixtures("helm")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


@pytest.mark.parametrize("kube_version", ["1.29", "1.37"])
@pytest.mark.parametrize("name", MATRIX)
def test_rendered_objects_are_valid_kubernetes(name: str, kube_version: str) -> None:
    objects = rendered(name, kube_version=f"{kube_version}.0").objects
    assert validate(objects, kube_version) == []
    monitoring = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    if name == "gpu-vllm":
        assert {o["kind"] for o in monitoring} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_the_crds_are_the_monitoring_kinds() -> None:
    assert set(crd_validators()) == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }


MONITOR = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "ServiceMonitor",
    "metadata": {"name": "m"},
    "spec": {"selector": {}, "endpoints": [{"port": "http"}]},
}
CONFIG_MAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(MONITOR, [], id="crd-valid"),
        pytest.param(
            {**MONITOR, "spec": {"selector": {}, "endpoints": [{"prot": "http"}]}},
            ["ServiceMonitor/m: Additional properties are not allowed ('prot' was unexpected) "
             "at spec.endpoints.0"],
            id="crd-typo",
        ),
        pytest.param(CONFIG_MAP, [], id="core-valid"),
        pytest.param({**CONFIG_MAP, "data": {"k": 1}},
                     ["ConfigMap/c: 1 is not of type 'string', 'null' at data.k"],
                     id="core-wrong-type"),
        pytest.param({**CONFIG_MAP, "dat": {}}, ["ConfigMap/c: Additional properties are not "
                                                 "allowed ('dat' was unexpected) at (the object)"],
                     id="core-unknown-field"),
        pytest.param({**CONFIG_MAP, "apiVersion": "example.com/v1", "kind": "Widget"},
                     ["Widget/c: no schema for example.com/v1 Widget in Kubernetes 1.37 or the "
                      "shipped CRDs"], id="unknown-kind"),
    ],
)  # fmt: skip
def test_validate_reports_each_problem_on_one_line(
    obj: dict[str, object], expected: list[str]
) -> None:
    problems = validate([obj], "1.37")
    assert [str(p) for p in problems] == expected
    assert all(isinstance(p, Problem) for p in problems)


def test_versions_outside_the_schemas_are_refused() -> None:
    assert KUBE_VERSIONS[0] == "1.29"
    assert KUBE_VERSIONS[-1] == "1.37"
    assert check_version("1.33.4") == "1.33.0"
    with pytest.raises(ConfigError, match=r"not one of 1\.29 to 1\.37"):
        check_version("1.28")
