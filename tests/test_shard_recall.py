"""CLIP recall@10 against exact search, whole and split in shards (index-stats --artifacts)."""

from __future__ import annotations

import json
import shutil

from imgsearch import artifacts
from tests.conftest import CLIP_SET_SHARDS, CLIP_SET_TIMEOUT

pytestmark = CLIP_SET_TIMEOUT


def test_an_exact_index_and_its_shards_find_every_exact_photo(clip_set, capsys):
    from imgsearch_tools.cli import main

    assert main(["index-stats", "--artifacts", str(clip_set), "--unseen-queries", "20"]) == 0
    printed = capsys.readouterr().out
    assert "whole index: recall@10 1.0000" in printed and "merged: recall@10 1.0000" in printed
    assert main(["index-stats", f"--artifacts={clip_set}", "--unseen-queries=20", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    keywords = record["queries"]["keyword"]
    assert keywords > 0 and record["queries"]["unseen"] == 20
    assert record["whole"]["factory"] == "Flat" and record["whole"]["photos"] == 300
    assert record["shards"]["count"] == CLIP_SET_SHARDS
    assert sum(record["shards"]["photos"]) == 300
    for layout in ("whole", "shards"):
        assert record[layout]["by_family"] == {"keyword": 1.0, "unseen": 1.0}


def test_shards_searched_coarsely_lose_recall_and_the_figure_shows_it(clip_set, tmp_path):
    """Each shard's index replaced by an IVF index probing one list of eight: the merged
    answers miss photos the whole (exact) index finds."""
    from imgsearch_tools.bench.shard_recall import recall_queries, sharded_recall
    from retrieval_service.embedding import load_embeddings
    from retrieval_service.sharding import shard_dir
    from retrieval_service.vector_index import VectorIndex

    root = tmp_path / "root"
    shutil.copytree(clip_set, root, symlinks=True)
    artifact_set = artifacts.resolve(root)
    for shard in range(CLIP_SET_SHARDS):
        path = shard_dir(artifact_set.path, shard) / artifacts.VECTOR_INDEX
        served = VectorIndex.load(path)
        rows = served.row_to_photo_idx
        photo_idx, embeddings = load_embeddings(artifact_set.path / artifacts.EMBEDDINGS)
        position = {p: i for i, p in enumerate(photo_idx.tolist())}
        vectors = embeddings[[position[p] for p in rows.tolist()]]
        path.unlink()
        VectorIndex.build(vectors, rows, factory="IVF8,Flat", nprobe=1).save(path)
    record = sharded_recall(artifact_set, recall_queries(artifact_set, 20))
    assert record["whole"]["by_family"] == {"keyword": 1.0, "unseen": 1.0}
    assert record["shards"]["params"] == {"nprobe": 1}
    assert record["shards"]["recall"] < 0.9
    assert record["shards"]["recall"] == min(record["shards"]["by_family"].values())
