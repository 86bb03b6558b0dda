"""Check rendered manifests: each object against the Kubernetes API schemas of one version
(kubernetes-validate, strict: an unknown field is an error), and each custom resource against
its CRD's schema (package data in crds/, SOURCES.md there), with unknown fields rejected too,
where the API server would prune them silently and so hide a typo."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from fleetserve.errors import ConfigError

# The versions the chart is checked for (kubernetes-validate 1.37.0 carries 1.25 to 1.37).
KUBE_VERSIONS = tuple(f"1.{minor}" for minor in range(29, 38))

Manifest = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """One object that is not valid, and why."""

    kind: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: {self.message}"


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a YAML stream such as `helm template` prints (empty documents skipped)."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"the manifests are not valid YAML: {exc}") from exc
    return [d for d in documents if d]


def check_version(kube_version: str) -> str:
    """`1.33` or `1.33.0` -> the x.y.0 form kubernetes-validate takes; ConfigError otherwise."""
    short = ".".join(kube_version.split(".")[:2])
    if short not in KUBE_VERSIONS:
        raise ConfigError(
            f"--kube-version {kube_version}: not one of {KUBE_VERSIONS[0]} to {KUBE_VERSIONS[-1]}"
        )
    return f"{short}.0"


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def crd_validators() -> Mapping[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a validator of that served version's openAPIV3Schema."""
    out: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
    for entry in resources.files("fleetserve.deploy").joinpath("crds").iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        crd = yaml.safe_load(entry.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def _where(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "(the object)"


def validate(objects: Iterable[Manifest], kube_version: str) -> list[Problem]:
    """Every problem found; an empty list means every object is valid for `kube_version`."""
    version = check_version(kube_version)
    validators = crd_validators()
    problems = []
    for obj in objects:
        kind = str(obj.get("kind", "?"))
        name = str(obj.get("metadata", {}).get("name", "?"))
        validator = validators.get((str(obj.get("apiVersion")), kind))
        if validator is not None:
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                problems.append(Problem(kind, name, f"{error.message} at {_where(error.path)}"))
            continue
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(Problem(kind, name, f"{exc.message} at {_where(exc.path)}"))
        except kubernetes_validate.SchemaNotFoundError:
            missing = f"no schema for {obj.get('apiVersion')} {kind} in Kubernetes {kube_version}"
            problems.append(Problem(kind, name, f"{missing} or the shipped CRDs"))
    return problems
