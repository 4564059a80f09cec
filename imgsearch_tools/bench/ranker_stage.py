"""Time the build's ranker stage alone, and the stacked ranker's ranking latency.

``python imgsearch_tools/bench/ranker_stage.py --artifacts SET --out DIR`` runs what
``imgsearch build`` runs after CLIP and the indexes (every ranker's training and validation,
the selection and the served configuration: ``train_set_rankers``) on the catalogue, keyword
index and CLIP embeddings of an existing artifact set, writing the rankers under ``DIR``, and
prints its wall and CPU seconds with each ranker's seconds. The stage is where commits differ
when CLIP's training has not changed, so timing it alone compares them in minutes instead of
a whole build. Run as a file with ``PYTHONPATH`` on another checkout, it times that
checkout's stage (it only needs ``train_set_rankers``).

When the stage trained ``stacked``, it then times that ranker as ``imgsearch eval``'s ranking
column does: ``score`` plus the top-10 sort, in-process, one thread, on requests of the 100
keyword candidates minus the user's earlier photos, for the catalogue's last conversions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np

# Requests timed, and how many of the first ones only warm the caches.
LATENCY_REQUESTS = 4000
WARM_UP = 200


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
    times = []
    for row in conversions.itertuples():
        result = keyword_index.retrieve(row.keyword, 100)
        photos = np.asarray(result.photo_idx, np.int64)
        keep = ~np.isin(photos, seen.get(row.user_idx, []))
        scores = np.asarray(result.scores, np.float32)[keep]
        request = RankQuery(row.user_idx, row.keyword, photos[keep], scores)
        start = time.perf_counter()
        scored = ranker.score(request)
        rank_by_scores(request.candidates, scored.scores)[:10]
        times.append(time.perf_counter() - start)
    ms = np.asarray(times[WARM_UP:]) * 1e3
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="an artifact set folder with CLIP")
    parser.add_argument("--out", required=True, help="a new folder for the stage's rankers")
    args = parser.parse_args(argv)
    src, out = Path(args.artifacts).resolve(), Path(args.out)
    out.mkdir(parents=True)
    print(json.dumps(stage_seconds(src, out)), flush=True)
    stacked_dir = out / "rankers" / "stacked"
    if stacked_dir.exists():
        print(json.dumps({"stacked_ranking": stacked_latency(src, stacked_dir)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
