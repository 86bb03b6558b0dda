"""Composition roots: a fixed local fleet, an autoscaled local fleet, the remote autoscaler.

Each is one module; this package re-exports their public names (`from fleetserve.stack import
...`).
"""

from fleetserve.stack.autoscaled import (
    AutoscaledStackSpec,
    build_autoscaled_gateway,
    run_autoscaled_stack,
)
from fleetserve.stack.launcher import AdapterLauncher
from fleetserve.stack.local import LocalStackSpec, run_local_stack
from fleetserve.stack.remote import (
    RemoteAutoscalerSpec,
    build_remote_autoscaler,
    run_remote_autoscaler,
)

__all__ = [
    "AdapterLauncher",
    "AutoscaledStackSpec",
    "LocalStackSpec",
    "RemoteAutoscalerSpec",
    "build_autoscaled_gateway",
    "build_remote_autoscaler",
    "run_autoscaled_stack",
    "run_local_stack",
    "run_remote_autoscaler",
]
