"""KubernetesActuator: scale a Deployment through its `scale` subresource, with lightkube.

`set_replicas(n)` sends `PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale` with the
body `{"spec":{"replicas":n}}` as a JSON merge patch (`application/merge-patch+json`, RFC
7386), which is what `kubectl scale` sends (kubectl's scaler patches `spec.replicas` with
MergePatchType). Why merge patch: for one scalar field it means exactly "set this field";
unlike a strategic merge patch it is also accepted by custom resources with a scale
subresource, and unlike server-side apply it does not make fleetserve the owner of
`spec.replicas` in a way that conflicts with whoever applies the Deployment (Helm,
`kubectl apply`); a JSON patch `replace` would fail where the field is absent. The
`fieldManager` is `fleetserve`, so managed fields show who scaled.

`current()` reads the scale's `spec.replicas`, as the HPA takes its current replica count;
Kubernetes omits the field when it is 0. The Deployment controller, not this actuator,
starts and drains pods: terminating pods leave `status.replicas`, and a readiness probe plus
a preStop hook give them the drain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube import ConfigError as KubeConfigError
from lightkube.config.kubeconfig import SingleConfig
from lightkube.models.autoscaling_v1 import Scale
from lightkube.resources.apps_v1 import Deployment
from lightkube.types import PatchType

from fleetserve.errors import ActuatorError, ConfigError
from fleetserve.fleet.actuators import ActuatorStatus

FIELD_MANAGER = "fleetserve"
DEFAULT_TIMEOUT_S = 10.0


def load_kubeconfig(
    kubeconfig: Path | None = None, context: str | None = None, *, purpose: str
) -> SingleConfig:
    """The configuration from `kubeconfig`, or else as kubectl finds one: the pod's service
    account in a cluster, then $KUBECONFIG, then ~/.kube/config. ConfigError names where it
    looked and `purpose` (e.g. "to scale deployment llm")."""
    where = f"from {kubeconfig}" if kubeconfig else "(in-cluster, $KUBECONFIG, ~/.kube)"
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = config.get(context_name=context)
    except (KubeConfigError, OSError) as exc:
        raise ConfigError(
            f"cannot load a Kubernetes configuration {where} {purpose}: {exc}"
        ) from exc
    if single is None:
        raise ConfigError(f"the Kubernetes configuration {where} has no current context")
    return single


@dataclass(frozen=True, slots=True)
class KubernetesTarget:
    """The Deployment to scale; namespace None means the kubeconfig's (or the pod's own)."""

    deployment: str
    namespace: str | None = None


class KubernetesActuator:
    def __init__(self, client: AsyncClient, target: KubernetesTarget) -> None:
        self.client = client
        self.deployment = target.deployment
        self.namespace: str = target.namespace or client.namespace
        self._desired: int | None = None

    @classmethod
    def connect(
        cls,
        target: KubernetesTarget,
        *,
        kubeconfig: Path | None = None,
        context: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> KubernetesActuator:
        """A client from `kubeconfig`, or else as kubectl finds one: the pod's service account
        in a cluster, then $KUBECONFIG, then ~/.kube/config."""
        try:
            single = load_kubeconfig(
                kubeconfig, context, purpose=f"to scale deployment {target.deployment}"
            )
        except ConfigError as exc:
            raise ActuatorError(str(exc)) from exc
        client = AsyncClient(
            config=single,
            namespace=target.namespace,
            timeout=httpx2.Timeout(timeout_s),
            field_manager=FIELD_MANAGER,
        )
        return cls(client, target)

    @property
    def name(self) -> str:
        return f"deployment {self.namespace}/{self.deployment}"

    # -- the Actuator protocol ----------------------------------------------------------
    async def set_replicas(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"replicas must be >= 0, not {n}")
        try:
            await self.client.patch(
                Deployment.Scale,
                self.deployment,
                {"spec": {"replicas": n}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
                field_manager=FIELD_MANAGER,
            )
        except httpx2.HTTPError as exc:
            raise self._error(exc, f"scale {self.name} to {n}") from exc
        self._desired = n

    async def current(self) -> int:
        return _spec_replicas(await self._scale())

    async def describe(self) -> ActuatorStatus:
        scale = await self._scale()
        replicas = _spec_replicas(scale)
        observed = scale.status.replicas if scale.status is not None else None
        return ActuatorStatus(
            kind="kubernetes",
            target=self.name,
            desired=replicas,
            current=replicas,
            observed=observed,
        )

    async def close(self) -> None:
        """Close the client; the Deployment keeps its replicas."""
        await self.client.close()

    # -- internals ----------------------------------------------------------------------
    async def _scale(self) -> Scale:
        try:
            scale: Scale = await self.client.get(
                Deployment.Scale, self.deployment, namespace=self.namespace
            )
        except httpx2.HTTPError as exc:
            raise self._error(exc, f"read the scale of {self.name}") from exc
        return scale

    def _error(self, exc: httpx2.HTTPError, doing: str) -> ActuatorError:
        """One clear line naming the deployment, for each way the API can fail."""
        if isinstance(exc, ApiError):
            code, message = exc.status.code, exc.status.message or exc.status.reason or ""
        elif isinstance(exc, httpx2.HTTPStatusError):  # an error body that is not a Status
            code, message = exc.response.status_code, exc.response.text[:200].strip()
        else:
            server = self.client.config.cluster.server
            reason = str(exc) or type(exc).__name__
            return ActuatorError(
                f"cannot reach the Kubernetes API at {server} to {doing}: {reason}"
            )
        if code == 404:
            return ActuatorError(f"{self.name} not found (Kubernetes API: {message})")
        if code == 403:
            return ActuatorError(
                f"not allowed to {doing}: {message}; the service account or user "
                f"needs the verbs get and patch on deployments/scale in namespace "
                f"{self.namespace}"
            )
        if code == 401:
            return ActuatorError(
                f"the Kubernetes API did not accept the credentials to {doing}: {message}"
            )
        return ActuatorError(f"the Kubernetes API refused to {doing}: HTTP {code}: {message}")


def _spec_replicas(scale: Scale) -> int:
    replicas = scale.spec.replicas if scale.spec is not None else None
    return replicas or 0  # the API omits 0 (omitempty)
