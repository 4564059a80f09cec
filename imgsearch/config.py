"""Every service's settings in one place: frozen dataclasses filled from flags and IMGSEARCH_* env.

Precedence: command-line flag > ``IMGSEARCH_*`` environment variable > default. Defaults work
on one machine with no flags at all. Each variable is described in :mod:`imgsearch.settings`,
from which the docs site's configuration reference is generated.
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
# Where builds write and servers read artifact sets unless told otherwise.
DEFAULT_ARTIFACTS = "var/artifacts"
MAX_RECENT_PHOTOS = 200
MAX_USER_ID_CHARS = 256


def env(name: str, default: str) -> str:
    """Return ``IMGSEARCH_<name>`` from the environment, or ``default``."""
    return os.environ.get(ENV_PREFIX + name, default)


def env_flag(name: str, default: str) -> bool:
    """On/off environment setting: off when empty, ``0`` or ``false``."""
    return env(name, default) not in ("", "0", "false")


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

    artifacts: str = field(default_factory=lambda: env("ARTIFACTS", DEFAULT_ARTIFACTS))
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
    # A fraction of a fast search's latency is too little queue to refuse for: the absolute
    # slack keeps clients from resending refusals at once (see the overload results page).
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
    # A certificate is re-read on SIGHUP and when its files change (checked this often);
    # health turns NOT_SERVING this long before it expires (imgsearch.certificates).
    tls_expiry_margin_s: float = field(
        default_factory=lambda: env_float("TLS_EXPIRY_MARGIN_S", 86_400.0)
    )
    tls_watch_s: float = field(default_factory=lambda: env_float("TLS_WATCH_S", 30.0))
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
    # The live catalogue (imgsearch.catalog_log): off, a set serves exactly as built; on,
    # retrieval serves only once it has replayed the store's catalogue log.
    live_catalogue: bool = field(default_factory=lambda: env_flag("LIVE_CATALOGUE", "0"))
    # How often retrieval and ranking servers read the live catalogue's log for new changes.
    catalog_poll_ms: float = field(default_factory=lambda: env_float("CATALOG_POLL_MS", 100.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.catalog_poll_ms <= 0:
            raise SystemExit(f"error: catalog poll must be positive, got {self.catalog_poll_ms}")

    def conversion_store(self) -> dict:
        """``open_store`` arguments: the DSN when set, else the SQLite file (by default
        beside the artifact root)."""
        if self.conversions_dsn:
            return {"dsn": self.conversions_dsn}
        return {"db": self.conversions_db or str(default_db_path(self.artifacts))}


@dataclass(frozen=True)
class RetrievalConfig(ConversionStoreConfig):
    """Retrieval server settings."""

    port: int = field(default_factory=lambda: env_int("RETRIEVAL_PORT", 50052))
    metrics_port: int = field(default_factory=lambda: metrics_port("retrieval"))
    admin_port: int = field(default_factory=lambda: env_int("RETRIEVAL_ADMIN_PORT", 50062))
    default_retriever: str = field(default_factory=lambda: env("DEFAULT_RETRIEVER", ""))
    # Micro-batching of the queries no cache answers: a batch costs far less per query than
    # one forward each, and the wait is small next to one forward.
    encode_batch: int = field(default_factory=lambda: env_int("ENCODE_BATCH", 16))
    encode_wait_ms: float = field(default_factory=lambda: env_float("ENCODE_WAIT_MS", 2.0))
    text_runtime: str = field(default_factory=lambda: env("TEXT_RUNTIME", ""))
    # -1 serves the whole set; i serves shard i of a set built with --shards.
    shard: int = field(default_factory=lambda: env_int("SHARD", -1))
    # The live catalogue's image-tower process: spawned at start-up (the first write does not
    # wait for torch to load) or at the first write (a server that never embeds never pays it).
    image_worker_at_start: bool = field(
        default_factory=lambda: env_flag("IMAGE_WORKER_AT_START", "1")
    )

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
    # The public door refuses a non-loopback address with neither tokens nor client
    # certificates unless this says the network is the lock (imgsearch.security).
    insecure_public: bool = field(default_factory=lambda: env_flag("INSECURE_PUBLIC", "0"))
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
    # The HTTP/JSON door and search page served by the gateway itself, on its host: -1 off,
    # 0 an ephemeral port; with the images of web_images (the catalogue's images/ folder).
    web_port: int = field(default_factory=lambda: env_int("GATEWAY_WEB_PORT", -1))
    web_images: str = field(default_factory=lambda: env("WEB_IMAGES", ""))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.web_port <= 65535:
            raise SystemExit(
                f"error: gateway web port must be between 0 and 65535 (-1: none), got "
                f"{self.web_port}"
            )
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
    artifacts: str = field(default_factory=lambda: env("ARTIFACTS", DEFAULT_ARTIFACTS))
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
