"""Every service's settings in one place: frozen dataclasses filled from flags and IMGSEARCH_* env.

Precedence: command-line flag > ``IMGSEARCH_*`` environment variable > default. Defaults work
on one machine with no flags at all. The gateway writes logged conversions and ranking reads
them; the SQLite file sits beside the artifact root (``var/artifacts`` ->
``var/artifacts-conversions.sqlite3``), never inside a set.

| variable | meaning | default |
|---|---|---|
| IMGSEARCH_ARTIFACTS | artifact root (with `current`) or one set folder | var/artifacts |
| IMGSEARCH_HOST | address servers bind | 127.0.0.1 |
| IMGSEARCH_GATEWAY_PORT | SearchService port | 50051 |
| IMGSEARCH_RETRIEVAL_PORT | RetrievalService port | 50052 |
| IMGSEARCH_RANKING_PORT | RankingService port | 50053 |
| IMGSEARCH_RETRIEVAL_ADDR | retrieval: a target (4); `T0;T1;...`: one per shard | 127.0.0.1:port |
| IMGSEARCH_RANKING_ADDR | ranking: a target (4) | 127.0.0.1:port |
| IMGSEARCH_SHARD | retrieval: serve this shard of a sharded set (0-based) | -1 = the whole set |
| IMGSEARCH_METRICS_PORT | Prometheus port base: gateway +0, retrieval +1, ranking +2 | 0 = off |
| IMGSEARCH_<SERVICE>_METRICS_PORT | one service's port (GATEWAY/RETRIEVAL/RANKING) | base+offset |
| IMGSEARCH_CONCURRENCY_LIMIT | `adaptive` (follows latency) or `fixed` (the max below) | adaptive |
| IMGSEARCH_MAX_INFLIGHT | a method's requests at once at most, then RESOURCE_EXHAUSTED | 64 |
| IMGSEARCH_MIN_INFLIGHT | adaptive: the lowest limit (bursts up to it are never refused) | 20 |
| IMGSEARCH_LIMIT_BUFFER | adaptive: latency above minRTT accepted, as a fraction of it | 0.25 |
| IMGSEARCH_LIMIT_SLACK_MS | adaptive: latency above minRTT always accepted, ms | 50 |
| IMGSEARCH_DEFAULT_RETRIEVER | retriever for unspecified requests | hybrid if CLIP, else keyword |
| IMGSEARCH_ENCODE_BATCH | retrieval: unseen queries encoded together at most | 16 |
| IMGSEARCH_ENCODE_WAIT_MS | retrieval: the longest an unseen query waits for company | 2 |
| IMGSEARCH_TEXT_RUNTIME | retrieval: CLIP text runtime (`torch-fp32`, `onnx-int8`...) | build's |
| IMGSEARCH_DEFAULT_RANKER | ranker for unspecified requests | the set's validation choice |
| IMGSEARCH_TIMEOUT_MS | gateway budget for a search when the client sets no deadline | 1000 |
| IMGSEARCH_RANKING_BUDGET_MS | the part of a search's budget kept for ranking | 300 |
| IMGSEARCH_GRACE_S | graceful-shutdown grace period | 5 |
| IMGSEARCH_MAX_CONNECTION_AGE_S | close each client connection after this long (5) | 0 = never |
| IMGSEARCH_LOG_FORMAT | `json` or `text` | json |
| IMGSEARCH_CONVERSIONS_DB | SQLite file of logged conversions | `<root>-conversions.sqlite3` |
| IMGSEARCH_CONVERSIONS_DSN | PostgreSQL DSN of the conversion store (wins over the file) | unset |
| IMGSEARCH_FOLDIN_CONVERSIONS | logged conversions ranking reads per unseen user (0 = off) | 50 |
| IMGSEARCH_FOLDIN_TIMEOUT_MS | how long ranking waits for them before going on without | 20 |
| IMGSEARCH_ACCESS_LOG | `1`: one log line per RPC with its request id | off |
| IMGSEARCH_ADMIN_HOST | address the admin ports bind | 127.0.0.1 |
| IMGSEARCH_GATEWAY_ADMIN_PORT | the gateway's admin port | 50061 |
| IMGSEARCH_RETRIEVAL_ADMIN_PORT | retrieval's admin port | 50062 |
| IMGSEARCH_RANKING_ADMIN_PORT | ranking's admin port | 50063 |
| IMGSEARCH_ADMIN_TOKENS_FILE | bearer tokens the admin ports accept (1) | none |
| IMGSEARCH_TLS_CERT | PEM certificate chain: the service port serves TLS | none: plaintext |
| IMGSEARCH_TLS_KEY | PEM private key of that certificate | none |
| IMGSEARCH_TLS_CLIENT_CA | PEM CA: clients must show a certificate it signed (mutual TLS) | none |
| IMGSEARCH_AUTH_TOKENS_FILE | gateway: bearer tokens its service port accepts (1) | none |
| IMGSEARCH_REFLECTION | `on`, `off`, `auto`: on only for a plaintext loopback port | auto |
| IMGSEARCH_CLIENT_CA | CA a client trusts for servers' certificates (2): TLS when set | none |
| IMGSEARCH_CLIENT_CERT | that client's certificate, for mutual TLS (2) | none |
| IMGSEARCH_CLIENT_KEY | that client's private key (2) | none |
| IMGSEARCH_TOKEN_FILE | `imgsearch search`/`bench`: its first token is sent (3) | none |
| IMGSEARCH_ADMIN_TOKEN_FILE | `imgsearch reload`: its first token is sent (3) | none |
| IMGSEARCH_WEB_HOST | address `imgsearch web` (the HTTP/JSON door and page) binds | 127.0.0.1 |
| IMGSEARCH_WEB_PORT | its HTTP port | 8080 |
| IMGSEARCH_WEB_IMAGES | folder of `<photo_id>.jpg` files the page shows | none |
| IMGSEARCH_GATEWAY_ADDR | where `imgsearch web` finds the gateway (4) | 127.0.0.1:port |

(1) One token per line, `#` comments; a call must carry `authorization: Bearer <token>`;
re-read on SIGHUP. The admin ports refuse to start on a non-loopback IMGSEARCH_ADMIN_HOST
without IMGSEARCH_ADMIN_TOKENS_FILE; with IMGSEARCH_AUTH_TOKENS_FILE every RPC on the gateway's
service port but health (its API, reflection, any service added later) needs a token.
(2) The clients: the gateway towards retrieval and ranking, `imgsearch search` and `bench`
(whose `--cacert`, `--cert`, `--key` override them). `imgsearch reload` talks to the admin
ports, which are plaintext: it sends a token, never a certificate.
(3) A file, not the token itself, so the token never shows in a process list.
`imgsearch web` reads the same TLS_* and AUTH_TOKENS_FILE settings for its own HTTP port and
the same CLIENT_* and TOKEN_FILE settings towards the gateway.
(4) `HOST:PORT`, a comma-separated list of them (replicas), or any gRPC name such as
`dns:///NAME:PORT` (every address the name resolves to); requests are balanced round-robin
over the replicas that are up and SERVING, and UNAVAILABLE is retried on another one
(`imgsearch.balancing`).
(5) gRPC's GOAWAY: calls in flight finish within the grace period and the client reconnects.
A client that balances over the addresses a name resolves to (a Kubernetes headless Service)
resolves the name again only when a connection closes, so without this it never sends to
replicas added after it connected.

The admin port of each server carries `imgsearch.admin.v1.AdminService` and the standard health
service, always in plaintext (Kubernetes' gRPC probes cannot speak TLS), so it binds loopback
unless told otherwise; bound elsewhere it refuses to start without IMGSEARCH_ADMIN_TOKENS_FILE.
The service port carries the service's own API, health and (per IMGSEARCH_REFLECTION)
reflection, over TLS when IMGSEARCH_TLS_CERT is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from imgsearch.balancing import channel_target, shard_targets
from imgsearch.conversion_store import default_db_path

ENV_PREFIX = "IMGSEARCH_"
CONCURRENCY_LIMITS = ("adaptive", "fixed")

# Request limits shared by the gateway and the stages.
MAX_QUERY_CHARS = 256
MAX_K = 1000
MAX_CANDIDATES_K = 1000
DEFAULT_K = 10
DEFAULT_CANDIDATES_K = 100
MAX_RECENT_PHOTOS = 200
MAX_USER_ID_CHARS = 256


def env(name: str, default: str) -> str:
    """Return ``IMGSEARCH_<name>`` from the environment, or ``default``."""
    return os.environ.get(ENV_PREFIX + name, default)


def env_int(name: str, default: int) -> int:
    """Integer environment setting; a malformed value fails fast naming the variable."""
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {ENV_PREFIX}{name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    """Number environment setting; a malformed value fails fast naming the variable."""
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"error: {ENV_PREFIX}{name}={raw!r} is not a number") from None


# Added to IMGSEARCH_METRICS_PORT per service, so services started one by one with the same
# environment never try to bind the same port.
METRICS_PORT_OFFSETS = {"gateway": 0, "retrieval": 1, "ranking": 2}


def metrics_port(service: str) -> int:
    """``service``'s Prometheus port from the environment (0: metrics off).

    ``IMGSEARCH_<SERVICE>_METRICS_PORT`` when set, else ``IMGSEARCH_METRICS_PORT`` plus the
    service's offset in :data:`METRICS_PORT_OFFSETS`.
    """
    own = env_int(f"{service.upper()}_METRICS_PORT", 0)
    if own:
        return own
    base = env_int("METRICS_PORT", 0)
    return base + METRICS_PORT_OFFSETS[service] if base else 0


@dataclass(frozen=True)
class ServerConfig:
    """Settings every server shares."""

    artifacts: str = field(default_factory=lambda: env("ARTIFACTS", "var/artifacts"))
    host: str = field(default_factory=lambda: env("HOST", "127.0.0.1"))
    port: int = 0
    metrics_port: int = field(default_factory=lambda: env_int("METRICS_PORT", 0))
    # Each method's requests in flight: an adaptive limit (imgsearch.admission.GradientLimit)
    # that admits more than min_inflight only while latency stays within limit_buffer of its
    # level with few in flight, up to max_inflight (the limit itself when fixed): small enough
    # that an overloaded server refuses at once instead of queueing ~1 s of work. The floor,
    # 20 (Gradient2's), takes the bursts a restarted replica or a frozen peer's share brings
    # (8, the level minRTT is measured at, refused those at the gateway).
    concurrency_limit: str = field(default_factory=lambda: env("CONCURRENCY_LIMIT", "adaptive"))
    max_inflight: int = field(default_factory=lambda: env_int("MAX_INFLIGHT", 64))
    min_inflight: int = field(default_factory=lambda: env_int("MIN_INFLIGHT", 20))
    limit_buffer: float = field(default_factory=lambda: env_float("LIMIT_BUFFER", 0.25))
    # A quarter of a 3 ms keyword search is under a millisecond: without an absolute slack a
    # closed loop of 50 clients (p99 80 ms, no error with a fixed limit) lost 17% of its
    # throughput to refusals it sent again at once.
    limit_slack_ms: float = field(default_factory=lambda: env_float("LIMIT_SLACK_MS", 50.0))
    grace_s: float = field(default_factory=lambda: float(env_int("GRACE_S", 5)))
    max_connection_age_s: float = field(
        default_factory=lambda: env_float("MAX_CONNECTION_AGE_S", 0.0)
    )
    admin_host: str = field(default_factory=lambda: env("ADMIN_HOST", "127.0.0.1"))
    admin_port: int = 0
    admin_tokens_file: str = field(default_factory=lambda: env("ADMIN_TOKENS_FILE", ""))
    tls_cert: str = field(default_factory=lambda: env("TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: env("TLS_KEY", ""))
    tls_client_ca: str = field(default_factory=lambda: env("TLS_CLIENT_CA", ""))
    # Only the gateway reads IMGSEARCH_AUTH_TOKENS_FILE: the stages trust the gateway by mTLS.
    auth_tokens_file: str = ""
    reflection: str = field(default_factory=lambda: env("REFLECTION", "auto"))

    def __post_init__(self) -> None:
        if self.concurrency_limit not in CONCURRENCY_LIMITS:
            raise SystemExit(
                f"error: concurrency limit must be one of {', '.join(CONCURRENCY_LIMITS)}, "
                f"got {self.concurrency_limit!r}"
            )
        if self.min_inflight < 1 or self.max_inflight < 1:
            raise SystemExit(
                f"error: in-flight limits must be at least 1, got min {self.min_inflight} and "
                f"max {self.max_inflight}"
            )
        if self.limit_buffer < 0:
            raise SystemExit(f"error: limit buffer must not be negative, got {self.limit_buffer}")
        if self.limit_slack_ms < 0:
            raise SystemExit(f"error: limit slack must not be negative, got {self.limit_slack_ms}")


@dataclass(frozen=True)
class ConversionStoreConfig(ServerConfig):
    """Where the services that share logged conversions (gateway, ranking) find them."""

    conversions_db: str = field(default_factory=lambda: env("CONVERSIONS_DB", ""))
    conversions_dsn: str = field(default_factory=lambda: env("CONVERSIONS_DSN", ""))

    def conversion_store(self) -> dict:
        """``open_store`` arguments: the DSN when set, else the SQLite file (by default
        beside the artifact root)."""
        if self.conversions_dsn:
            return {"dsn": self.conversions_dsn}
        return {"db": self.conversions_db or str(default_db_path(self.artifacts))}


@dataclass(frozen=True)
class RetrievalConfig(ServerConfig):
    """Retrieval server settings."""

    port: int = field(default_factory=lambda: env_int("RETRIEVAL_PORT", 50052))
    metrics_port: int = field(default_factory=lambda: metrics_port("retrieval"))
    admin_port: int = field(default_factory=lambda: env_int("RETRIEVAL_ADMIN_PORT", 50062))
    default_retriever: str = field(default_factory=lambda: env("DEFAULT_RETRIEVER", ""))
    # Micro-batching of the queries no cache answers: at batch 8-16 a ViT-B-32 text tower
    # costs a quarter of its batch-1 time per query, and 2 ms is small next to one forward.
    encode_batch: int = field(default_factory=lambda: env_int("ENCODE_BATCH", 16))
    encode_wait_ms: float = field(default_factory=lambda: env_float("ENCODE_WAIT_MS", 2.0))
    text_runtime: str = field(default_factory=lambda: env("TEXT_RUNTIME", ""))
    # -1 serves the whole set; i serves shard i of a set built with --shards.
    shard: int = field(default_factory=lambda: env_int("SHARD", -1))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encode_batch < 1:
            raise SystemExit(f"error: encode batch must be at least 1, got {self.encode_batch}")
        if self.encode_wait_ms < 0:
            raise SystemExit(f"error: encode wait must not be negative, got {self.encode_wait_ms}")
        if self.shard < -1:
            raise SystemExit(f"error: shard must be 0 or more (-1: whole set), got {self.shard}")


@dataclass(frozen=True)
class RankingConfig(ConversionStoreConfig):
    """Ranking server settings."""

    port: int = field(default_factory=lambda: env_int("RANKING_PORT", 50053))
    metrics_port: int = field(default_factory=lambda: metrics_port("ranking"))
    admin_port: int = field(default_factory=lambda: env_int("RANKING_ADMIN_PORT", 50063))
    default_ranker: str = field(default_factory=lambda: env("DEFAULT_RANKER", ""))
    foldin_conversions: int = field(default_factory=lambda: env_int("FOLDIN_CONVERSIONS", 50))
    foldin_timeout_ms: int = field(default_factory=lambda: env_int("FOLDIN_TIMEOUT_MS", 20))


@dataclass(frozen=True)
class GatewayConfig(ConversionStoreConfig):
    """Gateway settings."""

    port: int = field(default_factory=lambda: env_int("GATEWAY_PORT", 50051))
    metrics_port: int = field(default_factory=lambda: metrics_port("gateway"))
    admin_port: int = field(default_factory=lambda: env_int("GATEWAY_ADMIN_PORT", 50061))
    auth_tokens_file: str = field(default_factory=lambda: env("AUTH_TOKENS_FILE", ""))
    retrieval_addr: str = field(
        default_factory=lambda: env(
            "RETRIEVAL_ADDR", f"127.0.0.1:{env_int('RETRIEVAL_PORT', 50052)}"
        )
    )
    ranking_addr: str = field(
        default_factory=lambda: env("RANKING_ADDR", f"127.0.0.1:{env_int('RANKING_PORT', 50053)}")
    )
    timeout_ms: int = field(default_factory=lambda: env_int("TIMEOUT_MS", 1000))
    ranking_budget_ms: int = field(default_factory=lambda: env_int("RANKING_BUDGET_MS", 300))
    # How the gateway reaches retrieval and ranking: TLS when client_ca is set, its own
    # certificate when the stages ask for one (mutual TLS).
    client_ca: str = field(default_factory=lambda: env("CLIENT_CA", ""))
    client_cert: str = field(default_factory=lambda: env("CLIENT_CERT", ""))
    client_key: str = field(default_factory=lambda: env("CLIENT_KEY", ""))

    def __post_init__(self) -> None:
        try:
            for target in shard_targets(self.retrieval_addr):
                channel_target(target)
        except ValueError as exc:
            raise SystemExit(f"error: retrieval address: {exc}") from None
        try:
            if ";" in self.ranking_addr:
                raise ValueError(f"{self.ranking_addr!r}: ranking is not sharded (no ';')")
            channel_target(self.ranking_addr)
        except ValueError as exc:
            raise SystemExit(f"error: ranking address: {exc}") from None


@dataclass(frozen=True)
class WebConfig:
    """`imgsearch web` settings: the HTTP/JSON door and search page in front of the gateway.

    Its own port serves TLS with ``tls_cert``/``tls_key`` (client certificates with
    ``tls_client_ca``) and asks for ``Authorization: Bearer`` with a token of
    ``auth_tokens_file``, the same files and variables the gateway reads.
    """

    host: str = field(default_factory=lambda: env("WEB_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: env_int("WEB_PORT", 8080))
    gateway_addr: str = field(
        default_factory=lambda: env("GATEWAY_ADDR", f"127.0.0.1:{env_int('GATEWAY_PORT', 50051)}")
    )
    artifacts: str = field(default_factory=lambda: env("ARTIFACTS", "var/artifacts"))
    images: str = field(default_factory=lambda: env("WEB_IMAGES", ""))
    tls_cert: str = field(default_factory=lambda: env("TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: env("TLS_KEY", ""))
    tls_client_ca: str = field(default_factory=lambda: env("TLS_CLIENT_CA", ""))
    auth_tokens_file: str = field(default_factory=lambda: env("AUTH_TOKENS_FILE", ""))
    # The deadline of each call to the gateway (the gateway's own budget still applies).
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SystemExit(f"error: web port must be between 0 and 65535, got {self.port}")
        if self.timeout_s <= 0:
            raise SystemExit(f"error: web timeout must be positive, got {self.timeout_s}")
        try:
            channel_target(self.gateway_addr)
        except ValueError as exc:
            raise SystemExit(f"error: gateway address: {exc}") from None


def with_overrides(config, **overrides):
    """Return ``config`` with the non-None overrides applied (flags win over env and defaults)."""
    names = {f.name for f in fields(config)}
    values = {k: v for k, v in overrides.items() if v is not None and k in names}
    return type(config)(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **values})
