"""The Picker seam: choose one replica for a request from snapshots, or None."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fleetserve.routing.snapshot import ReplicaSnapshot, RouteRequest


class Picker(Protocol):
    name: str

    def pick(
        self, request: RouteRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaSnapshot | None:
        """Pick among `replicas` (already filtered to ready ones of the request's model).

        Returns None when none of them may take the request (all excluded or at capacity).
        """
        ...
