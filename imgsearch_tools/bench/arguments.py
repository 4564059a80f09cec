"""The arguments of `imgsearch bench`, `bench-suite`, `bench-shards` and `bench-feedback`."""

from __future__ import annotations

from imgsearch.config import DEFAULT_ARTIFACTS
from imgsearch.names import RANKER_CHOICES, RETRIEVER_CHOICES
from imgsearch_tools.bench import go_load
from imgsearch_tools.bench.commands import cmd_bench, cmd_bench_feedback
from imgsearch_tools.bench.scenarios import CANDIDATES_K, K
from imgsearch_tools.bench.shards import cmd_bench_shards
from imgsearch_tools.bench.suite import cmd_bench_suite
from imgsearch_tools.client_flags import add_client_security_arguments


def add_commands(subparsers) -> None:
    """Register bench and bench-suite."""
    p = subparsers.add_parser(
        "bench",
        help="load-test a SearchService (open or closed loop) and compare with in-process",
        description="Send realistic searches (users and keywords sampled from the catalogue's "
        "conversions, unique queries no cache has seen, or queries from a file) to TARGET, "
        "open-loop at a fixed rate (--qps) or closed-loop with N workers (--concurrency); report "
        "achieved QPS, latency percentiles, errors by status code and degraded responses; then "
        "time the same requests in-process (retrieval and ranking called directly) and print the "
        "ratio of end-to-end p50 to in-process p50.",
    )
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="gateway HOST:PORT, several as IP:PORT,IP:PORT,... or dns:///NAME:PORT (balanced "
        "round-robin per request, UNAVAILABLE retried on another gateway)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--qps", type=float, default=None, help="open loop: sends per second")
    mode.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: workers (default 10)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument(
        "--retriever",
        default="keyword",
        choices=RETRIEVER_CHOICES,
        help="retriever named in every request",
    )
    p.add_argument(
        "--ranker", default="als", choices=RANKER_CHOICES, help="ranker named in every request"
    )
    p.add_argument("-k", type=int, default=K, help="results per search")
    p.add_argument("--candidates-k", type=int, default=CANDIDATES_K, help="candidates per search")
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root or set for the queries and the in-process run "
        "(default: ask the gateway's AdminService at --admin which set it serves)",
    )
    p.add_argument(
        "--admin",
        default=None,
        help="the gateway's admin HOST:PORT (default 127.0.0.1:50061 or "
        "IMGSEARCH_GATEWAY_ADMIN_PORT; token from IMGSEARCH_ADMIN_TOKEN_FILE)",
    )
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline per request, seconds")
    p.add_argument(
        "--load-generator",
        default="python",
        choices=go_load.CHOICES,
        help="python (grpc.aio, default), go (a compiled grpc-go client that costs the machine "
        "about half the CPU per search; built on first use with Debian's golang-go and "
        "golang-google-grpc-dev; plaintext, one gateway) or auto (go when it builds)",
    )
    p.add_argument(
        "--queries",
        default="catalogue",
        metavar="catalogue|unique|FILE",
        help="what to search for: keywords sampled from the catalogue's conversions (default), "
        "unique queries (a catalogue keyword, another word and a number never sent before: no "
        "cache has them), or the lines of FILE",
    )
    p.add_argument(
        "--unique-share",
        type=float,
        default=0.0,
        help="with catalogue or FILE queries: the share (0-1) of requests made unique",
    )
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    p.add_argument("--in-process-requests", type=int, default=500, help="requests timed in-process")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    add_client_security_arguments(p)
    p.set_defaults(handler=cmd_bench)

    p = subparsers.add_parser(
        "bench-suite",
        help="start the services and run the standard load, fault and reload scenarios",
        description="Make sure the demo artifact set exists, start retrieval, ranking and the "
        "gateway as separate `imgsearch serve` processes on free ports, run the standard scenarios "
        "(keyword+ALS open loop and closed loop at c=1/10/50, keyword+none, hybrid+ALS when "
        "the set has CLIP), a bare three-hop grpc.aio chain against keyword+ALS at c=10 "
        "(server CPU per search per tier, and the ratio), the JSON door (inside the gateway) "
        "against gRPC at --json-qps, a reflection-only client, the "
        "ranking server killed and restarted mid-load, and a hot reload mid-load; then the "
        "ViT-B-32 section: a 1,000-photo demo set built (once, under OUT/vit-b-32) with a "
        "random-weight ViT-B-32, served and measured with cached, keyword and unique "
        "queries, then overloaded (capacity closed loop at c=8, 3x that offered open loop "
        "for 20 s, a closed-loop run 5 s after); write OUT/bench.json and OUT/bench.md.",
    )
    p.add_argument("--data", default="var/demo-data", help="demo data folder (built if missing)")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root to serve")
    p.add_argument(
        "--out",
        default="var/bench",
        help="report folder: new, empty, or one bench-suite wrote before",
    )
    p.add_argument("--no-build", action="store_true", help="fail instead of building the demo")
    p.add_argument(
        "--results-page",
        default=None,
        metavar="FILE.md",
        help="also write OUT/bench.md as the docs site's results page, under a header naming "
        "this command, the commit and the machine",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into folders bench-suite (or the demo, for --data/--artifacts) did not "
        "make, beside their files; none of them is deleted or overwritten",
    )
    p.add_argument("--qps", type=float, default=400.0, help="open-loop rate (default 400)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per scenario")
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument(
        "--fault-qps",
        type=float,
        default=200.0,
        help="open-loop rate during the kill and reload scenarios (default 200)",
    )
    p.add_argument(
        "--json-qps",
        type=float,
        default=200.0,
        help="open-loop rate of the JSON-door scenario, HTTP and gRPC alike (default 200)",
    )
    p.add_argument(
        "--json-rounds",
        type=int,
        default=5,
        help="rounds of the JSON-door scenario, one gRPC and one HTTP run each, the first "
        "alternating; the p99 the door adds is the median of the rounds' (default 5)",
    )
    p.add_argument(
        "--json-duration",
        type=float,
        default=30.0,
        help="measured seconds of each JSON-door run (default 30: 6,000 requests at 200 qps)",
    )
    p.add_argument(
        "--json-door-deployment",
        choices=("in-gateway", "standalone"),
        default="in-gateway",
        help="where the JSON-door scenario runs the door: inside the gateway's process "
        "(`serve gateway --web-port`, default) or as `imgsearch web` in front of it",
    )
    p.add_argument("--kill-duration", type=float, default=30.0, help="kill scenario seconds")
    p.add_argument("--reload-duration", type=float, default=15.0, help="reload scenario seconds")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated subset: scenario names, 'floor' (a bare gRPC chain against "
        "keyword + ALS, CPU per search), 'json-door', 'reflection', 'kill', 'reload', "
        "'vit-b-32' (the ViT-B-32 section's steady scenarios), 'overload' (its overload "
        "scenario), 'filters' (filtered retrieval: recall and the cost of a filter)",
    )
    p.add_argument(
        "--floor-load-generator",
        default="auto",
        choices=go_load.CHOICES,
        help="the load generator of the floor section, for both the bare chain and imgsearch: "
        "auto (default: the compiled grpc-go one when Debian's golang-go and "
        "golang-google-grpc-dev are installed, else python), go, or python",
    )
    p.add_argument("--skip-faults", action="store_true", help="no kill or reload scenario")
    p.add_argument(
        "--tls",
        default=None,
        metavar="CERTS",
        help="serve with TLS, mutual TLS between gateway and stages and a gateway token, all "
        "from a `make certs` folder (e.g. var/certs), and load through them",
    )
    p.add_argument(
        "--skip-real-clip",
        action="store_true",
        help="no ViT-B-32 section (its first run builds a 1,000-photo set: about 2 minutes)",
    )
    p.add_argument(
        "--skip-overload",
        action="store_true",
        help="no overload scenario in the ViT-B-32 section (capacity closed loop, 3x that "
        "offered open loop, recovery: about 70 s)",
    )
    p.add_argument(
        "--real-clip-qps",
        type=float,
        default=150.0,
        help="ViT-B-32 section: open-loop rate (default 150)",
    )
    p.add_argument(
        "--real-clip-duration",
        type=float,
        default=20.0,
        help="ViT-B-32 section: seconds of the unique-query target scenario (default 20)",
    )
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument(
        "--in-process-requests",
        type=int,
        default=500,
        help="requests timed in-process (no gRPC) for the comparison column",
    )
    p.set_defaults(handler=cmd_bench_suite)

    p = subparsers.add_parser(
        "bench-shards",
        help="measure sharded retrieval per shard count: exactness, latency, CPU per search",
        description="Serve the current set whole and split into each shard count (hard-linked "
        "copies resharded under OUT/shards/), as separate `imgsearch serve` processes (one per "
        "shard, ranking, the gateway); check that every catalogue keyword and 300 (by default) "
        "unseen queries get, with each retriever, exactly the unsharded answer (ids and "
        "scores); run keyword and hybrid load, open and closed loop; write OUT/shards.json and "
        "OUT/shards.md. Run it alone on the machine (CPU figures).",
    )
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root or set")
    p.add_argument("--shards", default="1,2,4", help="shard counts, 1 first (default 1,2,4)")
    p.add_argument(
        "--unseen-queries",
        type=int,
        default=300,
        help="unseen multi-word queries checked against the unsharded answers, beside every "
        "catalogue keyword (default 300)",
    )
    p.add_argument(
        "--out", default="var/bench", help="report folder: new, empty, or one it wrote before"
    )
    p.add_argument("--force", action="store_true", help="write beside other files in OUT")
    p.add_argument("--qps", type=float, default=200.0, help="open-loop rate (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per scenario")
    p.add_argument("--channels", type=int, default=2, help="client channels (connections)")
    p.add_argument("--requests", type=int, default=2000, help="distinct requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    p.add_argument(
        "--no-load",
        action="store_true",
        help="check the answers only, no load scenarios: for a catalogue whose servers need "
        "most of a machine shared with other work (no latency or CPU figures)",
    )
    p.set_defaults(handler=cmd_bench_shards)

    p = subparsers.add_parser(
        "bench-feedback",
        help="measure LogConversions throughput (events/s, latency) on SQLite and PostgreSQL",
        description="For each backend, start `imgsearch serve gateway` on a fresh conversion "
        "store (a scratch SQLite file in OUT, or a scratch schema on the PostgreSQL server, "
        "dropped afterwards), send batches of new events closed-loop at each concurrency, and "
        "report acknowledged events per second, call latency, errors and CPU per 1,000 events; "
        "write OUT/feedback.json and OUT/feedback.md.",
    )
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root to serve")
    p.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    p.add_argument(
        "--postgres-dsn",
        default=None,
        help="PostgreSQL server for the postgres backend (default: IMGSEARCH_CONVERSIONS_DSN)",
    )
    p.add_argument("--batch", type=int, default=100, help="events per call (default 100)")
    p.add_argument(
        "--concurrency", default="1,4,16", help="calls in flight, comma-separated (default 1,4,16)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    p.add_argument(
        "--out",
        default="var/bench",
        help="report folder: new, empty, or one imgsearch's benchmarks wrote before",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder holding other files, beside them (none is deleted or "
        "overwritten)",
    )
    p.set_defaults(handler=cmd_bench_feedback)
