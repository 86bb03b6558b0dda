"""Settings every test process inherits."""

from __future__ import annotations

import os

# Gateways the tests start (in-process or as processes, which inherit this environment) stop
# without the load-balancer delay of a graceful shutdown (`shutdown_delay_s`, 2 s by
# default): no load balancer sends them anything. Tests of the delay set it themselves.
os.environ.setdefault("FLEETSERVE_SHUTDOWN_DELAY_S", "0")
