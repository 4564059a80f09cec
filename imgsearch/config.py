"""Every service's settings in one place: frozen dataclasses filled from flags and IMGSEARCH_* env.

Precedence: command-line flag > ``IMGSEARCH_*`` environment variable > default. Defaults work
on one machine with no flags at all.

| variable | meaning | default |
|---|---|---|
| IMGSEARCH_ARTIFACTS | artifact root (with `current`) or one set folder | var/artifacts |
| IMGSEARCH_HOST | address servers bind | 127.0.0.1 |
| IMGSEARCH_GATEWAY_PORT | SearchService port | 50051 |
| IMGSEARCH_RETRIEVAL_PORT | RetrievalService port | 50052 |
| IMGSEARCH_RANKING_PORT | RankingService port | 50053 |
| IMGSEARCH_RETRIEVAL_ADDR | where the gateway finds retrieval | 127.0.0.1:<retrieval port> |
| IMGSEARCH_RANKING_ADDR | where the gateway finds ranking | 127.0.0.1:<ranking port> |
| IMGSEARCH_METRICS_PORT | Prometheus port base (gateway +0, retrieval +1, ranking +2) | 0 = off |
| IMGSEARCH_MAX_INFLIGHT | requests a server handles at once before RESOURCE_EXHAUSTED | 64 |
| IMGSEARCH_DEFAULT_RETRIEVER | retriever for unspecified requests | hybrid if CLIP, else keyword |
| IMGSEARCH_ENCODE_BATCH | retrieval: unseen queries encoded together at most | 16 |
| IMGSEARCH_ENCODE_WAIT_MS | retrieval: the longest an unseen query waits for company | 2 |
| IMGSEARCH_TEXT_RUNTIME | retrieval: CLIP text runtime (`torch-fp32`, `onnx-int8`...) | build's |
| IMGSEARCH_DEFAULT_RANKER | ranker for unspecified requests | best trained, else popularity |
| IMGSEARCH_TIMEOUT_MS | gateway budget for a search when the client sets no deadline | 1000 |
| IMGSEARCH_RANKING_BUDGET_MS | the part of a search's budget kept for ranking | 300 |
| IMGSEARCH_GRACE_S | graceful-shutdown grace period | 5 |
| IMGSEARCH_LOG_FORMAT | `json` or `text` | json |
| IMGSEARCH_ACCESS_LOG | `1`: one log line per RPC with its request id | off |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

ENV_PREFIX = "IMGSEARCH_"

# Request limits shared by the gateway and the stages.
MAX_QUERY_CHARS = 256
MAX_K = 1000
MAX_CANDIDATES_K = 1000
DEFAULT_K = 10
DEFAULT_CANDIDATES_K = 100
MAX_RECENT_PHOTOS = 200


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


@dataclass(frozen=True)
class ServerConfig:
    """Settings every server shares."""

    artifacts: str = field(default_factory=lambda: env("ARTIFACTS", "var/artifacts"))
    host: str = field(default_factory=lambda: env("HOST", "127.0.0.1"))
    port: int = 0
    metrics_port: int = field(default_factory=lambda: env_int("METRICS_PORT", 0))
    # Small enough that an overloaded server refuses at once instead of queueing ~1 s of work.
    max_inflight: int = field(default_factory=lambda: env_int("MAX_INFLIGHT", 64))
    grace_s: float = field(default_factory=lambda: float(env_int("GRACE_S", 5)))


@dataclass(frozen=True)
class RetrievalConfig(ServerConfig):
    """Retrieval server settings."""

    port: int = field(default_factory=lambda: env_int("RETRIEVAL_PORT", 50052))
    default_retriever: str = field(default_factory=lambda: env("DEFAULT_RETRIEVER", ""))
    # Micro-batching of the queries no cache answers: at batch 8-16 a ViT-B-32 text tower
    # costs a quarter of its batch-1 time per query, and 2 ms is small next to one forward.
    encode_batch: int = field(default_factory=lambda: env_int("ENCODE_BATCH", 16))
    encode_wait_ms: float = field(default_factory=lambda: env_float("ENCODE_WAIT_MS", 2.0))
    text_runtime: str = field(default_factory=lambda: env("TEXT_RUNTIME", ""))

    def __post_init__(self) -> None:
        if self.encode_batch < 1:
            raise SystemExit(f"error: encode batch must be at least 1, got {self.encode_batch}")
        if self.encode_wait_ms < 0:
            raise SystemExit(f"error: encode wait must not be negative, got {self.encode_wait_ms}")


@dataclass(frozen=True)
class RankingConfig(ServerConfig):
    """Ranking server settings."""

    port: int = field(default_factory=lambda: env_int("RANKING_PORT", 50053))
    default_ranker: str = field(default_factory=lambda: env("DEFAULT_RANKER", ""))


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    """Gateway settings."""

    port: int = field(default_factory=lambda: env_int("GATEWAY_PORT", 50051))
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


def with_overrides(config, **overrides):
    """Return ``config`` with the non-None overrides applied (flags win over env and defaults)."""
    names = {f.name for f in fields(config)}
    values = {k: v for k, v in overrides.items() if v is not None and k in names}
    return type(config)(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **values})
