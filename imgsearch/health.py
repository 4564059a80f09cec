"""The standard health service with a bound on the Watch streams held open at once."""

from __future__ import annotations

import grpc
from grpc_health.v1._async import HealthServicer

# Each Watch holds a stream (and a task) for as long as the client keeps it open; probes use
# Check, and a few watchers per server (balancers, sidecars) are all there are in practice.
MAX_HEALTH_WATCHES = 100


class BoundedHealthServicer(HealthServicer):
    """:class:`HealthServicer` that answers RESOURCE_EXHAUSTED past ``max_watches`` open
    Watch streams, so that clients opening streams without end cannot exhaust a server
    (health needs no token)."""

    def __init__(self, max_watches: int = MAX_HEALTH_WATCHES):
        super().__init__()
        self.max_watches = max_watches
        self.watching = 0

    async def Watch(self, request, context) -> None:
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.max_watches} health Watch streams at once; use Check",
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
