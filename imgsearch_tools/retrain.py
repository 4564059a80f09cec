"""`imgsearch train`: retrain rankers on the current set's catalogue and publish a new set."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from imgsearch_tools.build import current_set, stage_printer, train_set_rankers


def retrain_rankers(
    root: str,
    rankers: list[str],
    tune: bool = False,
    int8: bool = True,
    keep: int = 3,
    show_progress: bool = True,
    logged=None,
    tombstones: dict[str, int] | None = None,
) -> Path:
    """Train ``rankers`` on the current set's catalogue and publish them as a new set version.

    Rankers of the current set that are not retrained are kept as they are. ``logged`` (an
    ``events_frame`` of the conversion store) is merged into the catalogue first: into the
    catalogue as built (kept as ``catalogue_base`` in the new set), so that events merged by
    an earlier retraining are not counted twice and events deleted since are gone. Logged
    events add users, which renumbers them, so then every ranker of the set is retrained.
    ``tombstones`` (``ConversionStore.tombstones``) drop the events of deleted users made
    before their deletion, wherever they come from (:func:`forget_users`), and retrain every
    ranker when any were there.
    """
    from imgsearch import artifacts
    from imgsearch.catalogue import Catalogue
    from imgsearch.conversion_store.forget import forget_users
    from imgsearch.conversion_store.tables import merge_logged
    from retrieval_service.keyword_index import KeywordIndex

    current = current_set(root)
    log = stage_printer(show_progress)
    merged = None
    skip: tuple[str, ...] = (artifacts.MANIFEST,)
    if logged is None:
        catalogue = Catalogue.load(current.file(artifacts.CATALOGUE_DIR))
    else:
        base_name = (
            artifacts.BASE_CATALOGUE_DIR
            if current.has(artifacts.BASE_CATALOGUE_DIR)
            else artifacts.CATALOGUE_DIR
        )
        catalogue, merged = merge_logged(Catalogue.load(current.file(base_name)), logged)
        log(
            f"logged conversions: {merged['merged']:,} of {merged['events']:,} merged "
            f"({merged['unknown_photo']:,} of photos outside the catalogue dropped), "
            f"{merged['users']:,} users, {merged['new_users']:,} new"
        )
        rankers = list(dict.fromkeys([*rankers, *current.rankers]))
        skip += (artifacts.CATALOGUE_DIR, artifacts.BASE_CATALOGUE_DIR)
    catalogue, forgotten = forget_users(catalogue, tombstones or {})
    if forgotten:
        log(f"deleted users: {forgotten:,} of their earlier conversions left out")
        rankers = list(dict.fromkeys([*rankers, *current.rankers]))
        skip += (artifacts.CATALOGUE_DIR,)
    fingerprint = current.manifest.get("data_fingerprint", "")
    with artifacts.writing_set(root, fingerprint) as (set_dir, version):
        artifacts.link_tree(current.path, set_dir, skip=skip)
        if merged is not None:
            artifacts.link_tree(current.file(base_name), set_dir / artifacts.BASE_CATALOGUE_DIR)
        if merged is not None or forgotten:
            catalogue.save(set_dir / artifacts.CATALOGUE_DIR)
        for name in rankers:
            shutil.rmtree(set_dir / artifacts.RANKERS_DIR / name, ignore_errors=True)
        keyword_index = KeywordIndex.load(current.file(artifacts.KEYWORD_INDEX))
        kept = {
            name: set_dir / artifacts.RANKERS_DIR / name
            for name in current.rankers
            if name not in rankers
        }
        trained = train_set_rankers(
            catalogue,
            set_dir,
            current.path,
            keyword_index,
            rankers,
            tune=tune,
            int8=int8,
            show_progress=show_progress,
            kept=kept,
        )
        manifest = {
            **current.manifest,
            **trained,
            "version": version,
            "parent_version": current.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rankers": {**current.manifest.get("rankers", {}), **trained["rankers"]},
        }
        if merged is not None:
            manifest["logged_conversions"] = merged
        if forgotten:
            manifest["forgotten_conversions"] = forgotten
        artifacts.write_manifest(set_dir, manifest)
        artifacts.publish(root, set_dir)
    artifacts.prune(root, keep=keep)
    log(f"artifact set {version} (rankers retrained) ready: {set_dir}")
    return set_dir
