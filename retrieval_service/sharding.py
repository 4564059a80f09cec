"""Retrieval shards of an artifact set: the keyword and vector indexes split by photo.

A set built or resharded with ``--shards N`` holds, beside its whole indexes::

    shards/shards.json              count, how photos are assigned, photos per shard
    shards/<i>/keyword_index.npz    shard i's keyword index (the whole vocabulary)
    shards/<i>/vector.faiss         shard i's vector index (the set's factory; a default
                                    inverted file gets its size's lists, shard_factory),
    shards/<i>/vector.json           its sidecar, and its row map (vector.rows.npy)

A photo lives on the shard drawn from a CRC-32 of its id (:func:`shard_of_ids`), so a
rebuild that renumbers the photos (the live catalogue's photos folded in, others removed)
leaves every photo on its shard; sets sharded before recorded ``photo_idx % N``
(:data:`BY_INDEX`), which a live catalogue on them keeps for their own photos. Each shard keeps
catalogue-wide photo indexes, so a caller merging shards breaks ties exactly as one index over
every photo does.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np

from imgsearch import artifacts

SHARDS_DIR = "shards"
LAYOUT = "shards.json"
MAX_SHARDS = 256


class ShardError(artifacts.ArtifactError):
    """A set has no shards, not that one, or a shard's files are incomplete."""


# The assignments a layout records: the current one, and the one of older sets.
BY_ID = "crc32(photo_id) % count"
BY_INDEX = "photo_idx % count"


def shard_of_id(photo_id: str, count: int) -> int:
    """The shard a photo lives on in a set sharded :data:`BY_ID`."""
    return zlib.crc32(photo_id.encode("utf-8")) % count


def shard_of_ids(photo_ids, count: int) -> np.ndarray:
    """The shard each photo lives on (:func:`shard_of_id` of each id)."""
    return np.asarray([shard_of_id(str(p), count) for p in photo_ids], np.int64)


def shard_dir(set_dir: str | Path, shard: int) -> Path:
    """Where shard ``shard``'s files are in a set."""
    return Path(set_dir) / SHARDS_DIR / str(shard)


def read_layout(set_dir: str | Path) -> dict | None:
    """The set's ``shards/shards.json``, None when the set is not sharded."""
    path = Path(set_dir) / SHARDS_DIR / LAYOUT
    return json.loads(path.read_text()) if path.exists() else None


def check_shard(set_dir: str | Path, shard: int) -> dict:
    """The layout of a set that has shard ``shard``.

    Raises
    ------
    ShardError
        When the set is not sharded or has fewer shards.
    """
    layout = read_layout(set_dir)
    if layout is None:
        raise ShardError(
            f"artifact set {set_dir} has no retrieval shards: build it with --shards N or run "
            "`imgsearch shard --shards N`"
        )
    if not 0 <= shard < int(layout["count"]):
        raise ShardError(f"artifact set {set_dir} has {layout['count']} shards, not shard {shard}")
    return layout


def write_shards(set_dir: str | Path, count: int, log=None) -> dict:
    """Split the set's keyword index and vector index into ``count`` shards (module docstring).

    Parameters
    ----------
    set_dir:
        A set being written (its whole keyword index, and its embeddings and vector index
        when it has CLIP, already there); it must hold no shards yet.
    count:
        Number of shards, 2 to :data:`MAX_SHARDS`.
    log:
        ``log(message)`` for progress lines, or None.

    Returns
    -------
    dict
        The layout written to ``shards/shards.json`` (recorded in the manifest too).
    """
    import pandas as pd

    from retrieval_service.embedding import load_embeddings
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.vector_index import VectorIndex, shard_factory

    set_dir = Path(set_dir)
    if not 2 <= count <= MAX_SHARDS:
        raise ValueError(f"shards must be between 2 and {MAX_SHARDS}, got {count}")
    out = set_dir / SHARDS_DIR
    if out.exists():
        raise ShardError(f"{out} exists: a set is sharded once")
    photos = pd.read_parquet(
        set_dir / artifacts.CATALOGUE_DIR / "photos.parquet", columns=["photo_id"]
    )
    assignment = shard_of_ids(photos["photo_id"], count)
    keyword_index = KeywordIndex.load(set_dir / artifacts.KEYWORD_INDEX)
    vectors = None
    if (set_dir / artifacts.VECTOR_INDEX).exists():
        photo_idx, embeddings = load_embeddings(set_dir / artifacts.EMBEDDINGS)
        whole = VectorIndex.load(set_dir / artifacts.VECTOR_INDEX, row_to_photo_idx=photo_idx)
        vectors = (photo_idx, embeddings, whole.factory, whole.params, whole.params_by_query)
    layout: dict = {
        "count": count,
        "assignment": BY_ID,
        "photos": np.bincount(assignment, minlength=count).tolist(),
        "vector_factory": vectors[2] if vectors else None,
    }
    staging = set_dir / (SHARDS_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for shard in range(count):
            folder = staging / str(shard)
            folder.mkdir(parents=True)
            keyword_index.shard(assignment == shard).save(folder / artifacts.KEYWORD_INDEX)
            if vectors is not None:
                photo_idx, embeddings, factory, params, by_query = vectors
                rows = assignment[photo_idx] == shard
                # The whole index's search parameters, where it has them, per query class too.
                searched = {"ef_search": params.get("efSearch"), "nprobe": params.get("nprobe")}
                part = VectorIndex.build(
                    embeddings[rows],
                    photo_idx[rows],
                    factory=shard_factory(factory, int(np.count_nonzero(rows))),
                    **{name: value for name, value in searched.items() if value is not None},
                )
                part.set_query_params(by_query)
                part.save(folder / artifacts.VECTOR_INDEX)
            if log is not None:
                log(f"shard {shard + 1}/{count}: {layout['photos'][shard]:,} photos")
        (staging / LAYOUT).write_text(json.dumps(layout, indent=2))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return layout
