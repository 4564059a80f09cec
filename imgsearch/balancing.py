"""Client-side balancing over replicas: targets, round robin, health, retries (gRPC's own).

A client (the gateway towards retrieval and ranking, ``imgsearch bench`` towards gateways)
names a tier by one *target*:

- ``HOST:PORT``: one server;
- ``IP:PORT,IP:PORT,...``: replicas, handed to gRPC as its ``ipv4:``/``ipv6:`` multi-address
  target (IP literals only: a name that resolves to replicas is ``dns:///NAME:PORT``);
- any gRPC target name, e.g. ``dns:///retrieval.default.svc:50052`` (a Kubernetes headless
  Service: every ready pod's address).

The channel's service config then does the rest, in gRPC itself: ``round_robin`` over the
resolved addresses, per request; client-side health checking (a replica is picked only while
its ``grpc.health.v1`` status for the tier's service is SERVING, so one that is loading its
artifact set or shutting down gracefully gets no traffic); and a retry policy that sends a
call which failed with UNAVAILABLE to another replica, within the call's own deadline (the
search budget), with jittered backoff, throttled when many calls fail (so retries cannot
multiply the load on a tier in trouble), and honouring a server's ``grpc-retry-pushback-ms``
(a negative value: do not retry). No hedging: a slow replica is waited for, not raced.
"""

from __future__ import annotations

import ipaddress
import json

# Attempts per call, the first included: with two or more replicas a call that meets a dead
# one gets two more picks, each on the next replica of the round.
RETRY_ATTEMPTS = 3
RETRY_INITIAL_BACKOFF_S = 0.01  # gRPC draws each backoff at random in [0, current]
RETRY_MAX_BACKOFF_S = 0.1
RETRY_BACKOFF_MULTIPLIER = 2
# Retry throttling (gRFC A6): each failed call costs a token, each success returns 0.1;
# retries stop while half the tokens are gone. 100 tokens let a burst of 50 failures (every
# call in flight on a replica that dies) be retried, and stop retrying once more than about
# one call in eleven keeps failing.
RETRY_MAX_TOKENS = 100
RETRY_TOKEN_RATIO = 0.1
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _split_host_port(address: str) -> tuple[str, str]:
    """``("10.0.0.2", "50052")`` from ``10.0.0.2:50052``, ``[::1]:50052`` likewise."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, port


def channel_target(target: str) -> str:
    """The gRPC target for a tier's target (module docstring).

    Raises
    ------
    ValueError
        For an empty target, a list entry that is not ``IP:PORT``, or a list that mixes IPv4
        and IPv6 addresses (gRPC's multi-address targets take one family).
    """
    target = target.strip()
    if not target:
        raise ValueError("empty target")
    if "," not in target or target.startswith(SCHEMES) or "://" in target:
        return target
    families, addresses = set(), []
    for entry in (e.strip() for e in target.split(",")):
        if not entry:
            continue
        host, port = _split_host_port(entry)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{entry!r}: a list of replicas takes IP addresses; for a name that resolves "
                f"to several, use dns:///{entry}"
            ) from None
        families.add(ip.version)
        addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError(f"{target!r} mixes IPv4 and IPv6 addresses; use one family")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def service_config(service: str) -> str:
    """The channel's service config (JSON) for calls to the gRPC service ``service``."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": service},
            "methodConfig": [
                {
                    "name": [{"service": service}],
                    "retryPolicy": {
                        "maxAttempts": RETRY_ATTEMPTS,
                        "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                        "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
                        "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
            "retryThrottling": {"maxTokens": RETRY_MAX_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO},
        }
    )


def channel_options(service: str, options=()) -> list[tuple[str, object]]:
    """``options`` plus what balancing and retrying calls to ``service`` need."""
    return [
        *options,
        ("grpc.service_config", service_config(service)),
        # The config above is the one used: never one a DNS TXT record would supply.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
    ]


def shard_targets(value: str) -> list[str]:
    """One target per shard from ``T0;T1;...`` (a single target: one shard).

    Raises
    ------
    ValueError
        When a shard's target is empty.
    """
    targets = [t.strip() for t in value.split(";")]
    if not all(targets):
        raise ValueError(f"{value!r}: an empty shard target (shards are separated by ';')")
    return targets
