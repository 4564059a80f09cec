"""Inside the image: every port of `imgsearch serve all` says SERVING, and one Search has results.

Run by image-test.sh in the running container (``python - GATEWAY_PORT PORT... < this file``):
waits for grpc.health.v1 SERVING on each port given, then searches the gateway for a query
of the demo set, with the token of IMGSEARCH_TOKEN_FILE, and prints the results. Exit status
0 only when all of that held.
"""

import sys

from gateway.client import format_table, search, wait_for_serving
from imgsearch_tools.client_flags import client_security

QUERY = "red circle"


def main(gateway_port: int, ports: list[int]) -> int:
    for port in ports:
        wait_for_serving(f"127.0.0.1:{port}", timeout=300)
        print(f"[check] 127.0.0.1:{port} SERVING", flush=True)
    response = search(
        f"127.0.0.1:{gateway_port}", QUERY, k=5, timeout=30, security=client_security()
    )
    print(format_table(response, QUERY, ""), flush=True)
    if not response.results:
        print(f"[check] error: no results for {QUERY!r}", file=sys.stderr)
        return 1
    if response.degraded:
        print(f"[check] error: degraded search: {response.degraded_reason}", file=sys.stderr)
        return 1
    print(f"[check] Search {QUERY!r}: {len(response.results)} results", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), [int(port) for port in sys.argv[2:]]))
