"""`imgsearch bench-token-match`: the keyword fallback's cost per multi-word query, before/after.

On an artifact set's keyword index, for unseen multi-word queries (two catalogue keywords and a
word no keyword holds, as the shard bench draws them) and two-keyword queries, time per query:

* ``score-all``: every posting of every token sorted by photo and summed (the fallback before);
* ``scatter``: :func:`retrieval_service.token_match.top_k` (each token's confidences added into
  an accumulator indexed by photo, at most ``MAX_DEPTH`` per token), what retrieval ran before;
* ``subsets``: :func:`retrieval_service.token_match.match`, as retrieval runs it (the photos
  holding every token first, then those missing one only while they could still reach the top).

All run on the same per-token lists and bitsets, built once beforehand (as a serving index
caches them). The command checks that ``subsets`` returns the reference's photos and scores on
every query, and ``scatter`` on the queries where no token holds more than ``MAX_DEPTH`` photos,
and counts the queries the photos holding every token settled alone. Run it under the CPU lock
for figures.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from imgsearch.config import DEFAULT_ARTIFACTS
from imgsearch.latency import percentiles_ms

QUERIES = 300


def add_commands(subparsers) -> None:
    """Register bench-token-match."""
    p = subparsers.add_parser(
        "bench-token-match",
        help="time the keyword token-matching fallback per multi-word query: sorting every "
        "posting, adding them into an accumulator, or reading the photos holding every token first",
        description=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root or set")
    p.add_argument("--queries", type=int, default=QUERIES, help="queries of each kind")
    p.add_argument("--candidates-k", type=int, default=100, help="photos per query")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the queries")
    p.add_argument(
        "--tile",
        type=int,
        default=1,
        help="repeat the catalogue's photos this many times (photo ids shifted per copy): the "
        "posting lists of a catalogue N times larger with the same keyword mix, to time "
        "catalogues not built yet",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--results-page", default=None, help="also write the table as this docs results page"
    )
    p.set_defaults(handler=cmd_bench_token_match)


def multi_word_queries(vocabulary: list[str], count: int, seed: int = 0) -> dict[str, list[str]]:
    """Unseen queries (two keywords and an unknown word) and two-keyword queries."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(len(vocabulary), size=(count, 2))
    two = [f"{vocabulary[a]} {vocabulary[b]}" for a, b in pairs]
    return {
        "two keywords and an unknown word": [f"{q} {i}" for i, q in enumerate(two)],
        "two keywords": two,
    }


def time_queries(index, queries: list[str], k: int, repeats: int) -> dict:
    """Per-query milliseconds of both ways, and whether they agree on every query."""
    from retrieval_service.token_match import match, score_all, top_k

    prepared = []
    for query in queries:
        tokens = list(dict.fromkeys(query.split()))
        postings = [p for p in map(index.token_photos, tokens) if p is not None]
        if postings and query not in index:
            prepared.append((postings, len(tokens)))
    references = [score_all(p, n, k) for p, n in prepared]
    matches = [match(p, n, k) for p, n in prepared]  # also builds the bitsets, as serving does
    same = all(_agree(top_k(p, n, k), r) for (p, n), r in zip(prepared, references))
    exact = all(_agree(m, r) and m.complete for m, r in zip(matches, references))
    figures = {"queries": len(prepared), "identical": same, "subsets_identical": exact}
    figures["settled_by_all_tokens"] = sum(m.subsets_read == 1 for m in matches)
    for name, run in (("score-all", score_all), ("scatter", top_k), ("subsets", match)):
        times = []
        for _ in range(repeats):
            for postings, n_tokens in prepared:
                start = time.perf_counter()
                run(postings, n_tokens, k)
                times.append(time.perf_counter() - start)
        figures[name] = percentiles_ms(times, "_ms")
    # Queries no token of which holds more than MAX_DEPTH photos: exact, checked above.
    figures["complete"] = sum(top_k(p, n, k).complete for p, n in prepared)
    figures["postings_per_query"] = int(np.mean([sum(len(x) for x in p) for p, _ in prepared]))
    return figures


def tiled(index, photos: int, copies: int):
    """``index`` over ``copies`` copies of its photos, copy ``c`` shifted by ``c × photos``."""
    from retrieval_service.keyword_index import KeywordIndex

    lengths = np.diff(index.offsets)
    shift = np.repeat(np.arange(copies, dtype=np.int64) * photos, len(index.photo_idx))
    rows = np.repeat(np.arange(len(lengths)), lengths)
    order = np.argsort(np.tile(rows, copies), kind="stable")
    return KeywordIndex(
        index.vocabulary,
        index.offsets * copies,
        (np.tile(index.photo_idx, copies) + shift)[order],
        np.tile(index.conf, copies)[order],
    )


def cmd_bench_token_match(args) -> int:
    """Print (and optionally write) the fallback's per-query cost both ways."""
    from imgsearch import artifacts
    from retrieval_service.keyword_index import KeywordIndex

    artifact_set = artifacts.resolve(args.artifacts)
    index = KeywordIndex.load(artifact_set.file(artifacts.KEYWORD_INDEX))
    photos = int(index.photo_idx.max()) + 1 if len(index.photo_idx) else 0
    if args.tile > 1:
        index = tiled(index, photos, args.tile)
        photos *= args.tile
    report = {"artifacts": str(artifact_set.path), "photos": photos, "kinds": {}}
    lines = [
        f"{photos:,} photos, {len(index.vocabulary)} keywords, candidates_k "
        f"{args.candidates_k}, {args.repeats} passes over the queries; load average (1 min) "
        f"{os.getloadavg()[0]:.1f} at the start.",
        "",
        "| queries | n | postings/query | score-all mean / p99 ms | scatter mean / p99 ms "
        "| subsets mean / p99 ms | subsets vs scatter | settled by the photos holding every "
        "token | subsets identical | scatter complete (no token over the cap) | complete ones "
        "identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, queries in multi_word_queries(index.vocabulary.tolist(), args.queries).items():
        f = time_queries(index, queries, args.candidates_k, args.repeats)
        report["kinds"][kind] = f
        ref, scatter, subsets = f["score-all"], f["scatter"], f["subsets"]
        lines.append(
            f"| {kind} | {f['queries']} | {f['postings_per_query']} "
            f"| {ref['mean_ms']:.2f} / {ref['p99_ms']:.2f} "
            f"| {scatter['mean_ms']:.2f} / {scatter['p99_ms']:.2f} "
            f"| {subsets['mean_ms']:.2f} / {subsets['p99_ms']:.2f} "
            f"| {scatter['mean_ms'] / subsets['mean_ms']:.1f}x "
            f"| {f['settled_by_all_tokens']} of {f['queries']} "
            f"| {'yes' if f['subsets_identical'] else 'NO'} "
            f"| {f['complete']} of {f['queries']} | {'yes' if f['identical'] else 'NO'} |"
        )
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.results_page:
        from imgsearch_tools.results_page import write_results_page

        title = "Keyword token matching, per multi-word query"
        write_results_page(args.results_page, title, args.command_line, "\n".join(lines))
    agree = all(f["identical"] and f["subsets_identical"] for f in report["kinds"].values())
    return 0 if agree else 1


def _agree(match, reference) -> bool:
    """A complete match returns the reference's photos and scores exactly."""
    photos, scores = reference
    if not match.complete:
        return True
    return np.array_equal(match.photos, photos) and np.array_equal(match.scores, scores)
