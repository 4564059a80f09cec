"""The serving runtime every gRPC server shares: start-up, admin, reload and the request pipeline.

The layers, each a module (import-linter checks that each imports only those below it):

- :mod:`~imgsearch.serving.runtime`: a server's life (ports, load, reload, graceful stop);
- :mod:`~imgsearch.serving.admin`: the admin port (AdminService, health);
- :mod:`~imgsearch.serving.interceptor`: the port's one interceptor (tokens, then pipeline);
- :mod:`~imgsearch.serving.pipeline` and :mod:`~imgsearch.serving.auth`: the request
  pipeline of a method, and bearer-token checks;
- :mod:`~imgsearch.serving.ports`, :mod:`~imgsearch.serving.reflection`,
  :mod:`~imgsearch.serving.reload`: a listening server, reflection, the swappable state;
- :mod:`~imgsearch.serving.errors`, :mod:`~imgsearch.serving.metrics`,
  :mod:`~imgsearch.serving.logs`, :mod:`~imgsearch.serving.request_ids`: what the others use.

The names services import are re-exported here.
"""

from imgsearch.serving.errors import InvalidArgument, bad_request_status
from imgsearch.serving.logs import JsonFormatter, setup_logging
from imgsearch.serving.metrics import DEGRADED, LATENCY, start_metrics
from imgsearch.serving.reload import Reloadable
from imgsearch.serving.request_ids import REQUEST_ID_KEY, current_request_id
from imgsearch.serving.runtime import Service, run_until_signalled, start_service

__all__ = [
    "DEGRADED",
    "LATENCY",
    "REQUEST_ID_KEY",
    "InvalidArgument",
    "JsonFormatter",
    "Reloadable",
    "Service",
    "bad_request_status",
    "current_request_id",
    "run_until_signalled",
    "setup_logging",
    "start_metrics",
    "start_service",
]
