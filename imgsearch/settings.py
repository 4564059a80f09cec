"""Every ``IMGSEARCH_*`` environment variable the code reads: name, meaning, default.

The configuration reference of the docs site is generated from :data:`SETTINGS`, and a test
fails when the code reads a variable that has no row here, so the list cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgsearch.config import DEFAULT_ARTIFACTS

_TOKENS = (
    "One token per line followed by its scopes (`TOKEN search feedback:write`), `#` comments "
    "(a token alone, the older format, grants `search`, or `admin` in the admin file); a call "
    "must carry `authorization: Bearer <token>` with the method's scope; re-read on SIGHUP."
)
_CLIENT = (
    "Read by the clients: the gateway towards retrieval and ranking, `imgsearch search` and "
    "`bench` (whose `--cacert`, `--cert`, `--key` override it)."
)
_TARGET = (
    "A target: `HOST:PORT`, a comma-separated list of them (replicas), or any gRPC name such "
    "as `dns:///NAME:PORT`; requests are balanced round-robin over the replicas that are "
    "SERVING, and UNAVAILABLE is retried on another one."
)


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name without the prefix, what it does, its default."""

    name: str
    description: str
    default: str
    # Which programs read it: a service name, "all servers" or a command.
    read_by: str = "all servers"


SETTINGS: tuple[Setting, ...] = (
    Setting("ARTIFACTS", "Artifact root (holding `current`) or one set folder.", DEFAULT_ARTIFACTS),
    Setting("HOST", "Address the service ports bind.", "127.0.0.1"),
    Setting("GATEWAY_PORT", "SearchService (and FeedbackService) port.", "50051", "gateway"),
    Setting("RETRIEVAL_PORT", "RetrievalService port.", "50052", "retrieval"),
    Setting("RANKING_PORT", "RankingService port.", "50053", "ranking"),
    Setting(
        "RETRIEVAL_ADDR",
        f"Where the gateway reaches retrieval. {_TARGET} `T0;T1;...`: one target per shard.",
        "127.0.0.1:<retrieval port>",
        "gateway",
    ),
    Setting(
        "RANKING_ADDR",
        f"Where the gateway reaches ranking. {_TARGET}",
        "127.0.0.1:<ranking port>",
        "gateway",
    ),
    Setting(
        "SHARD",
        "Serve this shard of a set built with `--shards` (0-based).",
        "-1 (the whole set)",
        "retrieval",
    ),
    Setting(
        "METRICS_PORT",
        "Prometheus port base: gateway +0, retrieval +1, ranking +2.",
        "0 (metrics off)",
    ),
    Setting(
        "GATEWAY_METRICS_PORT",
        "The gateway's own Prometheus port (wins over the base).",
        "base + 0",
        "gateway",
    ),
    Setting(
        "RETRIEVAL_METRICS_PORT",
        "Retrieval's own Prometheus port (wins over the base).",
        "base + 1",
        "retrieval",
    ),
    Setting(
        "RANKING_METRICS_PORT",
        "Ranking's own Prometheus port (wins over the base).",
        "base + 2",
        "ranking",
    ),
    Setting(
        "CONCURRENCY_LIMIT",
        "`adaptive` (follows latency) or `fixed` (`MAX_INFLIGHT`) requests per method.",
        "adaptive",
    ),
    Setting(
        "MAX_INFLIGHT",
        "A method's requests at once at most; past it RESOURCE_EXHAUSTED with a pushback.",
        "64",
    ),
    Setting("MIN_INFLIGHT", "Adaptive limit's floor: bursts up to it are never refused.", "20"),
    Setting(
        "LIMIT_BUFFER",
        "Adaptive: latency above the uncontended level accepted, as a fraction of it.",
        "0.25",
    ),
    Setting(
        "LIMIT_SLACK_MS",
        "Adaptive: latency above the uncontended level always accepted, in ms.",
        "50",
    ),
    Setting(
        "DEFAULT_RETRIEVER",
        "Retriever for requests that name none.",
        "the set's validated choice (keyword when the set has no CLIP)",
        "retrieval",
    ),
    Setting(
        "ENCODE_BATCH",
        "Unseen queries encoded together by the CLIP text tower at most.",
        "16",
        "retrieval",
    ),
    Setting(
        "ENCODE_WAIT_MS",
        "The longest an unseen query waits for others to batch with.",
        "2",
        "retrieval",
    ),
    Setting(
        "TEXT_RUNTIME",
        "CLIP text runtime: `torch-fp32`, `torch-int8`, `onnx-fp32` or `onnx-int8`.",
        "the build's choice",
        "retrieval",
    ),
    Setting(
        "DEFAULT_RANKER",
        "Ranker for requests that name none.",
        "the set's validation choice",
        "ranking",
    ),
    Setting("TIMEOUT_MS", "A search's budget when the client sets no deadline.", "1000", "gateway"),
    Setting(
        "RANKING_BUDGET_MS", "The part of a search's budget kept for ranking.", "300", "gateway"
    ),
    Setting("GRACE_S", "Graceful-shutdown grace period for calls in flight, in seconds.", "5"),
    Setting(
        "MAX_CONNECTION_AGE_S",
        "Close each client connection after this long (GOAWAY; calls in flight finish), so "
        "clients resolve names again and reach replicas added since.",
        "0 (never)",
    ),
    Setting("LOG_FORMAT", "`json` or `text` log lines.", "json"),
    Setting("ACCESS_LOG", "`1`: one log line per RPC with its request id.", "off"),
    Setting(
        "CONVERSIONS_DB",
        "SQLite file of logged conversions and of the live catalogue's change log.",
        "`<artifact root>-conversions.sqlite3`",
        "gateway, ranking, retrieval, train",
    ),
    Setting(
        "CONVERSIONS_DSN",
        "PostgreSQL DSN of the conversion store (wins over the SQLite file).",
        "unset",
        "gateway, ranking, retrieval, train",
    ),
    Setting(
        "LIVE_CATALOGUE",
        "1: serve the live catalogue (photos written through CatalogService, read from the "
        "conversion store's catalogue log); retrieval stays NOT_SERVING until it has replayed "
        "the log. 0: every set serves as built and CatalogService refuses writes.",
        "0",
        "gateway, ranking, retrieval",
    ),
    Setting(
        "CATALOG_POLL_MS",
        "How often retrieval and ranking servers read the live catalogue's log for new "
        "changes (ranking: to score photos written since the set was built).",
        "100",
        "ranking, retrieval",
    ),
    Setting(
        "IMAGE_WORKER_AT_START",
        "1: a live-catalogue retrieval server spawns its image-tower process (torch, the set's "
        "CLIP) at start-up, so the first write does not wait for it. 0: at the first image to "
        "embed (servers that the gateway never asks to embed never spawn it).",
        "1",
        "retrieval",
    ),
    Setting(
        "FOLDIN_CONVERSIONS",
        "Logged conversions ranking reads per user the model has not seen (0: off).",
        "50",
        "ranking",
    ),
    Setting(
        "FOLDIN_TIMEOUT_MS",
        "How long ranking waits for them before going on without.",
        "20",
        "ranking",
    ),
    Setting(
        "ADMIN_HOST", "Address the admin ports bind (off loopback only with tokens).", "127.0.0.1"
    ),
    Setting("GATEWAY_ADMIN_PORT", "The gateway's admin port.", "50061", "gateway"),
    Setting("RETRIEVAL_ADMIN_PORT", "Retrieval's admin port.", "50062", "retrieval"),
    Setting("RANKING_ADMIN_PORT", "Ranking's admin port.", "50063", "ranking"),
    Setting(
        "ADMIN_TOKENS_FILE",
        f"Bearer tokens the admin ports accept. {_TOKENS} Required off loopback.",
        "none",
    ),
    Setting("TLS_CERT", "PEM certificate chain: the service port serves TLS.", "none (plaintext)"),
    Setting("TLS_KEY", "PEM private key of that certificate.", "none"),
    Setting(
        "TLS_EXPIRY_MARGIN_S",
        "Health turns NOT_SERVING this many seconds before the certificate expires.",
        "86400",
    ),
    Setting("TLS_WATCH_S", "How often the certificate files are checked for a rotation.", "30"),
    Setting(
        "TLS_CLIENT_CA", "PEM CA: clients must show a certificate it signed (mutual TLS).", "none"
    ),
    Setting(
        "AUTH_TOKENS_FILE",
        f"Bearer tokens the gateway's service port accepts (every RPC but health). {_TOKENS}",
        "none",
        "gateway",
    ),
    Setting(
        "WEB_HOST",
        "Address `imgsearch web` (the HTTP/JSON door and page) binds.",
        "127.0.0.1",
        "web",
    ),
    Setting("WEB_PORT", "HTTP port of `imgsearch web`.", "8080", "web"),
    Setting(
        "GATEWAY_WEB_PORT",
        "HTTP port of the JSON door and search page served inside the gateway's process, on "
        "the gateway's host, with its certificate and tokens (`0`: an ephemeral port).",
        "-1 (none)",
        "gateway",
    ),
    Setting(
        "WEB_IMAGES",
        "Folder of `<photo_id>.jpg` files the search page shows.",
        "none",
        "web, gateway",
    ),
    Setting(
        "GATEWAY_ADDR",
        f"Where `imgsearch web` reaches the gateway. {_TARGET}",
        "127.0.0.1:<gateway port>",
        "web",
    ),
    Setting(
        "INSECURE_PUBLIC",
        "`1` lets the gateway bind off loopback with neither tokens nor client certificates.",
        "0",
        "gateway",
    ),
    Setting("REFLECTION", "`on`, `off`, or `auto`: on only for a plaintext loopback port.", "auto"),
    Setting(
        "CLIENT_CA",
        f"CA a client trusts for servers' certificates: TLS when set. {_CLIENT}",
        "none",
        "gateway, search, bench",
    ),
    Setting(
        "CLIENT_CERT",
        f"That client's certificate, for mutual TLS. {_CLIENT}",
        "none",
        "gateway, search, bench",
    ),
    Setting(
        "CLIENT_KEY", f"That client's private key. {_CLIENT}", "none", "gateway, search, bench"
    ),
    Setting(
        "TOKEN_FILE",
        "A file whose first token `imgsearch search` and `bench` send (a file, so the "
        "token never shows in a process list).",
        "none",
        "search, bench",
    ),
    Setting(
        "ADMIN_TOKEN_FILE",
        "A file whose first token `imgsearch reload` sends to the admin ports.",
        "none",
        "reload",
    ),
)
