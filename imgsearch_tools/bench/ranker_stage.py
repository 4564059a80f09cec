"""Time the build's ranker stage alone, and the stacked ranker's ranking latency.

``python imgsearch_tools/bench/ranker_stage.py --artifacts SET --out DIR`` runs what
``imgsearch build`` runs after CLIP and the indexes (every ranker's training and validation,
the selection and the served configuration: ``train_set_rankers``) on the catalogue, keyword
index and CLIP embeddings of an existing artifact set, writing the rankers under ``DIR``, and
prints its wall and CPU seconds with each ranker's seconds. The stage is where commits differ
when CLIP's training has not changed, so timing it alone compares them in minutes instead of
a whole build. Run as a file with ``PYTHONPATH`` on another checkout, it times that
checkout's stage (it only needs ``train_set_rankers``).

When the stage trained ``stacked`` (or, with ``--latency-only``, the set already has it), it
times that ranker as ``imgsearch eval``'s ranking column does: ``score`` plus the top-10 sort,
in-process, one thread, on requests of the 100 keyword candidates minus the user's earlier
photos, with the user's 20 latest earlier photos as recent history, for the catalogue's last
conversions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

from imgsearch.latency import percentiles_ms

# Requests timed, and how many of the first ones only warm the caches.
LATENCY_REQUESTS = 4000
WARM_UP = 200
# Recent photos per request, as ``imgsearch eval`` sends them (``build_test_queries``).
RECENT_PHOTOS = 20


def stage_seconds(src: Path, out: Path) -> dict:
    """Run the ranker stage on set ``src`` into ``out``; its seconds and choices."""
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue
    from imgsearch_tools.build import train_set_rankers
    from ranking_service.rankers import RANKER_NAMES
    from retrieval_service.keyword_index import KeywordIndex

    catalogue = Catalogue.load(src / artifacts.CATALOGUE_DIR)
    keyword_index = KeywordIndex.load(src / artifacts.KEYWORD_INDEX)
    extra = {}
    if "choose_fusion_weights" in inspect.signature(train_set_rankers).parameters:
        extra["choose_fusion_weights"] = True  # what builds passed before the joint choice
    wall, cpu = time.perf_counter(), time.process_time()
    entries = train_set_rankers(
        catalogue, out, src, keyword_index, list(RANKER_NAMES), show_progress=True, **extra
    )
    return {
        "stage_wall_s": round(time.perf_counter() - wall, 1),
        "stage_cpu_s": round(time.process_time() - cpu, 1),
        "rankers_s": {name: entry.get("seconds") for name, entry in entries["rankers"].items()},
        "configuration_s": entries.get("configuration", {}).get("seconds"),
        "served": [entries.get("default_retriever"), entries.get("default_ranker")],
    }


def stacked_latency(src: Path, stacked_dir: Path) -> dict:
    """p50/p99 milliseconds of the stacked ranker at ``stacked_dir`` (module docstring)."""
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue
    from imgsearch.evaluation_protocol import recent_photos
    from imgsearch.image_embeddings import ImageEmbeddings
    from imgsearch.ranking_metrics import rank_by_scores
    from ranking_service.rankers import load_ranker
    from ranking_service.rankers.base import RankQuery
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.semantic import set_serving_threads

    set_serving_threads()
    catalogue = Catalogue.load(src / artifacts.CATALOGUE_DIR)
    keyword_index = KeywordIndex.load(src / artifacts.KEYWORD_INDEX)
    embeddings = ImageEmbeddings.load(src / artifacts.EMBEDDINGS)
    ranker = load_ranker("stacked", stacked_dir, catalogue, embeddings)
    conversions = catalogue.conversions.iloc[-LATENCY_REQUESTS:]
    seen = catalogue.conversions.groupby("user_idx")["photo_idx"].apply(np.asarray).to_dict()
    # As eval's requests: the user's last training photos sent as recent history.
    recent = recent_photos(catalogue.conversions.iloc[:-LATENCY_REQUESTS], RECENT_PHOTOS)
    no_photos = np.zeros(0, dtype=np.int64)
    times = []
    for row in conversions.itertuples():
        result = keyword_index.retrieve(row.keyword, 100)
        photos = np.asarray(result.photo_idx, np.int64)
        keep = ~np.isin(photos, seen.get(row.user_idx, []))
        scores = np.asarray(result.scores, np.float32)[keep]
        history = recent.get(row.user_idx, no_photos)
        request = RankQuery(row.user_idx, row.keyword, photos[keep], scores, history)
        start = time.perf_counter()
        scored = ranker.score(request)
        rank_by_scores(request.candidates, scored.scores)[:10]
        times.append(time.perf_counter() - start)
    return {"requests": len(times[WARM_UP:]), **percentiles_ms(times[WARM_UP:], "_ms")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="an artifact set folder with CLIP")
    parser.add_argument("--out", help="a new folder for the stage's rankers")
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="skip the stage: time the stacked ranker the artifact set already has",
    )
    args = parser.parse_args(argv)
    src = Path(args.artifacts).resolve()
    if args.latency_only:
        latency = stacked_latency(src, src / "rankers" / "stacked")
        print(json.dumps({"stacked_ranking": latency}), flush=True)
        return 0
    if not args.out:
        parser.error("--out is required unless --latency-only")
    out = Path(args.out)
    out.mkdir(parents=True)
    print(json.dumps(stage_seconds(src, out)), flush=True)
    stacked_dir = out / "rankers" / "stacked"
    if stacked_dir.exists():
        print(json.dumps({"stacked_ranking": stacked_latency(src, stacked_dir)}), flush=True)
    return 0


if __name__ == "__main__":
    # Run as a file, this folder leads sys.path: its profile.py would shadow the standard
    # library's module of that name, which torch imports.
    here = Path(__file__).resolve().parent
    sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    raise SystemExit(main())
