"""Every object the chart renders, over the matrix, is valid for Kubernetes 1.29 and 1.37
(kubernetes-validate's strict schemas: unknown fields are errors), and its prometheus-operator
objects are valid against their CRDs' schemas (tests/fixtures/k8s-crds, SOURCES.md there).
There is no API server here: admission, defaulting and the controllers are a real cluster's."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.chart_support import MATRIX, ROOT, need_helm, rendered

CRDS = ROOT / "tests" / "fixtures" / "k8s-crds"
KUBE_VERSIONS = ("1.29.0", "1.37.0")

pytestmark = pytest.mark.usefixtures("helm")


@pytest.fixture(scope="module")
def helm() -> None:
    need_helm()


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (the API server would prune them silently,
    which hides a typo), except where the schema keeps unknown fields on purpose."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a validator of the served version's openAPIV3Schema."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", MATRIX)
def test_rendered_objects_are_valid_kubernetes(name: str, kube_version: str) -> None:
    objects = rendered(name, kube_version=kube_version).objects
    validators = crd_validators()
    checked_crds = 0
    for obj in objects:
        where = f"{name} @ {kube_version}: {obj['kind']}/{obj['metadata']['name']}"
        key = (obj["apiVersion"], obj["kind"])
        if key in validators:
            errors = sorted(validators[key].iter_errors(obj), key=str)
            assert not errors, f"{where}: {errors[0].message} at {list(errors[0].path)}"
            checked_crds += 1
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
    monitoring = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert checked_crds == len(monitoring)


def test_the_crd_check_catches_a_typo() -> None:
    validator = crd_validators()[("monitoring.coreos.com/v1", "ServiceMonitor")]
    good = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"selector": {}, "endpoints": [{"port": "http"}]},
    }
    assert not list(validator.iter_errors(good))
    typo = {**good, "spec": {"selector": {}, "endpoints": [{"prot": "http"}]}}
    assert list(validator.iter_errors(typo))


def test_kubernetes_validate_catches_a_wrong_type() -> None:
    (deployment, *_) = [o for o in rendered("cpu-llamacpp").objects if o["kind"] == "Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "revisionHistoryLimit": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)
