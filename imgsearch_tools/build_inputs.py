"""A build's inputs from the store the servers use: deleted users' tombstones, logged
conversions, and the live catalogue's changes folded into the catalogue it builds.

Folding applies every change of the catalogue log (up to its high-water mark, which the set
records as ``catalog_log_seq``) to the catalogue read from the data folder: deleted photos leave
(with their keywords, conversions, colours and labels), replaced photos take their new keywords
and metadata, and new photos are appended in the order the log first wrote them, the order in
which the servers numbered them. The log's image embeddings are handed to the build as
precomputed embeddings, together with those of the served set for the other photos, so nothing
is embedded again: that needs the build to reuse the served CLIP (``--clip-model`` and
``--clip-pretrained SET/clip``); a build that trains a new CLIP keeps the live photos for keyword
search only, and says so.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from imgsearch.catalog_log import DELETE, CatalogLog, PhotoChange, replay
from imgsearch.catalogue import KEYWORD_COLUMNS, PHOTO_COLUMNS, Catalogue
from imgsearch_tools.conversions import open_existing_store, store_location

FOLDED_EMBEDDINGS = "folded_embeddings.npz"


def read_tombstones(args) -> dict[str, int]:
    """The deleted users' tombstones of the store the servers use ({} when none was made)."""
    location = _location(args)
    if "db" in location and not Path(location["db"]).exists():
        return {}
    with open_existing_store(location) as store:
        return store.tombstones()


def read_logged_events(args):
    """Every logged conversion, as an ``events_frame``, from the store the servers use."""
    from imgsearch.conversion_store.tables import events_frame

    with open_existing_store(store_location(args)) as store:
        frame = events_frame(store.scan())
        if not args.quiet:
            print(
                f"[imgsearch] read {len(frame):,} logged conversions from {store.location}",
                file=sys.stderr,
            )
    return frame


def read_catalog_changes(args) -> tuple[dict[str, PhotoChange], int]:
    """Each photo's last change in the catalogue log, and the log's high-water mark
    (``({}, 0)`` when the servers made no store)."""
    location = _location(args)
    if "db" in location and not Path(location["db"]).exists():
        return {}, 0
    with open_existing_store(location) as store:
        log = CatalogLog(store)
        high_water = log.high_water()
        return replay(log.since(0, max(1, high_water))), high_water


def _location(args) -> dict:
    return store_location(
        SimpleNamespace(
            artifacts=args.artifacts,
            conversions_db=getattr(args, "conversions_db", None),
            conversions_dsn=getattr(args, "conversions_dsn", None),
        )
    )


def fold_catalogue(catalogue: Catalogue, final: dict[str, PhotoChange]) -> Catalogue:
    """The catalogue with the log's last changes applied (see the module's docstring).

    Photos the log wrote are marked ``has_image`` when the log holds their embedding.
    """
    if not final:
        return catalogue
    photos = catalogue.photos
    ids = photos["photo_id"].astype(str)
    deleted = {p for p, c in final.items() if c.operation == DELETE}
    written = {p: c for p, c in final.items() if c.operation != DELETE}
    replaced = ids.isin(set(written)).to_numpy()
    kept = photos[~ids.isin(deleted).to_numpy()].copy()
    # Old photo_idx -> new (-1: deleted); a replaced photo keeps its place.
    new_idx = np.full(len(photos), -1, np.int64)
    new_idx[~ids.isin(deleted).to_numpy()] = np.arange(len(kept))
    rows = []
    for photo_id, change in written.items():
        record = change.record
        rows.append(
            {
                "photo_id": photo_id,
                "photo_image_url": "",
                "photo_description": record.get("description", ""),
                "ai_description": "",
                "photographer_username": record.get("photographer", ""),
                "stats_views": int(record.get("views", 0)),
                "stats_downloads": int(record.get("downloads", 0)),
                "has_image": change.embedding is not None,
                "photo_width": int(record.get("width", 0)),
                "photo_height": int(record.get("height", 0)),
                "photo_featured": False,
                "photo_submitted_at": pd.NaT,
            }
        )
    position = {p: i for i, p in enumerate(kept["photo_id"].astype(str))}
    appended = []
    for row in rows:
        at = position.get(row["photo_id"])
        if at is None:
            appended.append(row)
        else:  # replaced in place
            for column, value in row.items():
                kept.iat[at, kept.columns.get_loc(column)] = value
    folded = pd.concat([kept, pd.DataFrame(appended, columns=kept.columns)], ignore_index=True)
    folded["photo_idx"] = np.arange(len(folded))
    folded = folded.astype({k: v for k, v in PHOTO_COLUMNS.items() if k in folded.columns})
    index = {p: i for i, p in enumerate(folded["photo_id"].astype(str))}

    def remap(table: pd.DataFrame | None, drop_replaced: bool) -> pd.DataFrame | None:
        if table is None:
            return None
        old = table["photo_idx"].to_numpy()
        keep = new_idx[old] >= 0
        if drop_replaced:  # the log's version replaces these rows
            keep &= ~replaced[old]
        out = table[keep].copy()
        out["photo_idx"] = new_idx[old[keep]].astype(np.int32)
        return out

    from retrieval_service.live_catalogue import keyword_rows

    live_keywords = pd.DataFrame(
        [
            (index[p], keyword, confidence)
            for p, change in written.items()
            for keyword, confidence in keyword_rows(change.record)
        ],
        columns=["photo_idx", "keyword", "confidence"],
    )
    keywords = pd.concat(
        [remap(catalogue.keywords, drop_replaced=True), live_keywords], ignore_index=True
    ).astype(KEYWORD_COLUMNS)
    keywords = keywords.sort_values(["photo_idx", "keyword"], kind="stable", ignore_index=True)
    return replace(
        catalogue,
        photos=folded,
        keywords=keywords,
        conversions=remap(catalogue.conversions, drop_replaced=False).reset_index(drop=True),
        labels=remap(catalogue.labels, drop_replaced=True),
        colors=remap(catalogue.colors, drop_replaced=True),
    )


def fold_embeddings(
    catalogue: Catalogue, final: dict[str, PhotoChange], served_embeddings: Path, set_dir: Path
) -> Path | None:
    """Precomputed embeddings for the folded catalogue (written into the new set's folder):
    the log's for the photos it wrote, the served set's for the others; None when the log holds
    no embedding.

    Raises
    ------
    ValueError
        When the served set lacks an embedding of a photo with an image that the log did not
        write (its CLIP cannot stand for the build's).
    """
    from retrieval_service.embedding import save_embeddings
    from retrieval_service.embedding_sets import PrecomputedEmbeddings

    logged = {p: c.embedding for p, c in final.items() if c.embedding is not None}
    if not logged:
        return None
    served = PrecomputedEmbeddings.read(served_embeddings)
    served_rows = {p: i for i, p in enumerate(served.photo_ids.tolist())}
    ids, vectors = [], []
    with_image = catalogue.photos.loc[catalogue.photos["has_image"], "photo_id"].astype(str)
    for photo_id in with_image:
        if photo_id in logged:
            vectors.append(logged[photo_id])
        elif photo_id in served_rows:
            vectors.append(served.embeddings[served_rows[photo_id]])
        else:
            raise ValueError(
                f"photo {photo_id} has no embedding in the served set {served_embeddings}: "
                "folding the catalogue log needs the data the served set was built from"
            )
        ids.append(photo_id)
    out = Path(set_dir) / FOLDED_EMBEDDINGS
    save_embeddings(out, served.clip, ids, np.stack(vectors))
    return out


def fold_log(
    catalogue: Catalogue,
    catalog_log: tuple[dict[str, PhotoChange], int],
    out: str,
    embeddings: str | None,
    clip_model: str | None,
    log,
) -> tuple[Catalogue, dict[str, PhotoChange], Path | None, int]:
    """Fold the catalogue log into a build's catalogue.

    Returns
    -------
    tuple
        The folded catalogue, the changes folded, the served set's embeddings file to complete
        the log's with (None: the log's embeddings are not used), and the high-water mark.
    """
    from imgsearch import artifacts

    final, high_water = catalog_log
    if not final:
        return catalogue, final, None, high_water
    served = None
    with_vectors = any(c.embedding is not None for c in final.values())
    if with_vectors and clip_model and embeddings is None:
        try:
            served = artifacts.resolve(out).path / artifacts.EMBEDDINGS
        except artifacts.ArtifactError:
            served = None
        served = served if served is not None and served.exists() else None
    if with_vectors and served is None:
        final = {p: replace(c, embedding=None) for p, c in final.items()}
        log(
            "catalogue log: the photos it wrote are kept for keyword search only (their images "
            "are not stored); reuse the served CLIP (--clip-model NAME --clip-pretrained "
            "SET/clip) to keep their embeddings"
        )
    log(f"catalogue log: the last changes of {len(final):,} photos folded (up to {high_water})")
    return fold_catalogue(catalogue, final), final, served, high_water
