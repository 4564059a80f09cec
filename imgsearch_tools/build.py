"""`imgsearch build` and `imgsearch train`: one versioned artifact set from a catalogue."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from imgsearch.filters import FILTERS_FORMAT
from imgsearch.filters import MANIFEST_KEY as FILTERS_KEY
from imgsearch.names import RANKER_NAMES
from imgsearch_tools.build_inputs import read_catalog_changes, read_logged_events, read_tombstones
from imgsearch_tools.conversions import add_store_arguments
from imgsearch_tools.offline_candidates import (
    candidates_summary,
    served_candidates,
    served_retrievers,
)
from retrieval_service.clip_model import TRAIN_STEPS

# What `train` retrains by default: the rankers that learn from conversions.
TRAINED_RANKERS = tuple(n for n in RANKER_NAMES if n not in ("none", "popularity"))


def add_commands(subparsers) -> None:
    """Register build and train."""
    p = subparsers.add_parser(
        "build",
        help="validate an Unsplash Lite folder and build a versioned artifact set",
        description="Read DATA (Unsplash Lite layout), then write catalogue tables, the keyword "
        "index, CLIP embeddings + FAISS index (when images exist) and trained rankers as one "
        "versioned set under OUT/sets/<version>, and point OUT/current at it. Every retriever "
        "(keyword, CLIP, hybrid at several weights) x ranker is scored on a validation slice "
        "cut from the end of the conversions, and the served default is chosen there "
        "(docs/guides/ranking-selection.md; recorded in the manifest).",
    )
    p.add_argument("--data", required=True, help="folder in the Unsplash Lite layout")
    p.add_argument("--out", required=True, help="artifact root (sets/ and current are made here)")
    p.add_argument(
        "--rankers",
        default=",".join(RANKER_NAMES),
        help="comma-separated rankers to train (default: %(default)s)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="also pick each ranker's hyper-parameters on the validation slice (grids in "
        "ranking_service/training.py; recorded in the manifest)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="try INT8 for the DeepFM MLP, kept only if NDCG@10 stays within 1%% of FP32 and "
        "it is faster (default: on)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip CLIP even when images exist")
    p.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model name (default: the project's tiny CLIP, trained on the catalogue)",
    )
    p.add_argument(
        "--clip-pretrained",
        default=None,
        help="open_clip pretrained tag or local checkpoint path for --clip-model",
    )
    p.add_argument(
        "--embeddings",
        default=None,
        metavar="FILE_OR_DIR",
        help="image embeddings made beforehand by `imgsearch embed` (an .npz, or the shard "
        "folder of `embed --ray`) with the CLIP given by --clip-model/--clip-pretrained; "
        "checked against the catalogue's photos and that CLIP's weights",
    )
    p.add_argument(
        "--clip-steps",
        type=int,
        default=TRAIN_STEPS,
        help="CLIP training steps when training (default: %(default)s)",
    )
    p.add_argument(
        "--index-factory",
        default=None,
        help="FAISS factory string (default: Flat below 50k photos, else HNSW32)",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        help="also split the keyword and vector indexes into N retrieval shards by photo (each "
        "`serve retrieval --shard I` serves one; the gateway merges them); default: none",
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail on the first malformed row (default) or skip and count them",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        help="complete sets to keep; older ones built here are deleted, never the current one, "
        "one being written, or a folder that is not a set (default: 3)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="accept an OUT that holds other files than an artifact root's (left as they are)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_build)

    p = subparsers.add_parser(
        "train",
        help="retrain the rankers of the current artifact set into a new set version",
        description="Train rankers on the catalogue of ARTIFACTS/current and publish a new set "
        "that shares every other artifact (hard links) with it; running servers pick it up on "
        "`imgsearch reload`. As build does, it scores every ranker of the new set on a "
        "validation slice cut from the end of the conversions and chooses the served "
        "retriever, fusion weights and ranker there; --tune also picks hyper-parameters on "
        "it. Both are recorded in the manifest.",
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root (with current)")
    p.add_argument(
        "--rankers",
        default=",".join(TRAINED_RANKERS),
        help="comma-separated rankers to train (default: %(default)s)",
    )
    p.add_argument(
        "--tune", action="store_true", help="pick hyper-parameters on the validation slice first"
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gate INT8 for the DeepFM MLP (default: on)",
    )
    p.add_argument(
        "--with-logged-events",
        action="store_true",
        help="learn from the catalogue's conversions plus those logged through "
        "FeedbackService (the store found as the servers find it); every ranker of the set "
        "is retrained, since new users are added",
    )
    add_store_arguments(p, artifacts=False)
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        help="complete sets to keep, as for build (default: 3)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser(
        "shard",
        help="split the current set's keyword and vector indexes into N retrieval shards",
        description="Publish a new set version that shares every file of ARTIFACTS/current "
        "(hard links) and adds shards/: its keyword index and vector index split into N shards "
        "by photo (photo i on shard i mod N), each with the whole vocabulary and catalogue-wide "
        "photo indexes, so that the gateway's merge of the shards returns exactly what the "
        "whole set does. Serve shard I with `imgsearch serve retrieval --shard I`.",
    )
    p.add_argument("--artifacts", default="var/artifacts", help="artifact root (with current)")
    p.add_argument("--shards", type=int, required=True, help="number of shards (2 or more)")
    p.add_argument("--keep", type=int, default=3, help="complete sets to keep, as for build")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=cmd_shard)


def current_set(root: str):
    """The set ``root``'s ``current`` link names, for a command that makes the next one.

    Raises
    ------
    imgsearch.artifacts.ArtifactError
        When ``root`` is not an artifact root, or its current set does not load.
    """
    from imgsearch import artifacts

    if not (Path(root) / artifacts.CURRENT).exists():
        raise artifacts.ArtifactError(
            f"{root} is not an artifact root (no {artifacts.CURRENT} link); "
            "build one with `imgsearch build --data DIR --out ROOT`"
        )
    artifacts.check_root(root)
    return artifacts.resolve(root)


def build_artifacts(
    data: str,
    out: str,
    rankers: list[str],
    tune: bool = False,
    clip: bool = True,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    clip_steps: int = TRAIN_STEPS,
    index_factory: str | None = None,
    strict: bool = True,
    keep: int = 3,
    show_progress: bool = True,
    int8: bool = True,
    force: bool = False,
    embeddings: str | None = None,
    shards: int = 0,
    tombstones: dict[str, int] | None = None,
    catalog_log: tuple[dict, int] = ({}, 0),
) -> Path:
    """Build one artifact set from ``data`` under ``out`` and publish it; returns its folder.

    ``out`` must be new, empty or an artifact root (only ``sets/`` and ``current`` in it);
    ``force`` accepts a folder holding other files too, which are left as they are.
    ``embeddings`` (an ``imgsearch embed`` output, made with ``clip_model`` and
    ``clip_pretrained``) replaces embedding the images during the build. ``shards`` (2 or
    more) also splits the retrieval indexes into that many shards
    (:mod:`retrieval_service.sharding`). ``tombstones`` (``ConversionStore.tombstones``)
    leave out the conversions of users deleted since the data was written. ``catalog_log``
    (:func:`~imgsearch_tools.build_inputs.read_catalog_changes`) is folded into the catalogue
    (:mod:`imgsearch_tools.build_inputs`).
    """
    from imgsearch import artifacts
    from imgsearch.conversion_store.forget import forget_users
    from imgsearch.unsplash import read_unsplash
    from imgsearch_tools.build_inputs import fold_embeddings, fold_log
    from retrieval_service.keyword_index import KeywordIndex

    started = time.time()
    check_shard_count(shards, allow_none=True)
    check_artifact_root(out, force)
    log = _stage_printer(show_progress)
    log(f"reading {data}")
    catalogue, report = read_unsplash(data, show_progress=show_progress, strict=strict)
    log(report.summary())
    catalogue, forgotten = forget_users(catalogue, tombstones or {})
    if forgotten:
        log(f"deleted users: {forgotten:,} of their earlier conversions left out")
    catalogue, folded, served_embeddings, log_seq = fold_log(
        catalogue, catalog_log, out, embeddings, clip_model, log
    )
    fingerprint = artifacts.data_fingerprint(data)
    with artifacts.writing_set(out, fingerprint) as (set_dir, version):
        manifest: dict = {
            "version": version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data_dir": str(Path(data).resolve()),
            "data_fingerprint": fingerprint,
            "counts": {
                "photos": catalogue.n_photos,
                "photos_with_images": int(catalogue.photos["has_image"].sum()),
                "keywords": len(catalogue.keywords),
                "users": catalogue.n_users,
                "conversions": len(catalogue.conversions),
            },
            "versions": _library_versions(),
            "catalog_log_seq": log_seq,
        }
        if served_embeddings is not None:
            embeddings = fold_embeddings(catalogue, folded, served_embeddings, set_dir)
        manifest[FILTERS_KEY] = filter_columns(catalogue, log, show_progress)
        catalogue.save(set_dir / artifacts.CATALOGUE_DIR)
        log("building keyword index")
        keyword_index = KeywordIndex.from_keywords(catalogue.keywords)
        keyword_index.save(set_dir / artifacts.KEYWORD_INDEX)
        if clip and catalogue.photos["has_image"].any():
            from imgsearch_tools.demo_data import query_families
            from retrieval_service.clip_artifacts import build_clip_artifacts
            from retrieval_service.clip_model import ClipSpec

            spec = ClipSpec(clip_model, clip_pretrained) if clip_model else None
            log("CLIP: " + (f"{clip_model} ({clip_pretrained})" if spec else "training tiny CLIP"))
            manifest["clip"] = build_clip_artifacts(
                catalogue,
                set_dir,
                spec,
                factory=index_factory,
                train_steps=clip_steps,
                show_progress=show_progress,
                query_families=query_families(catalogue),
                embeddings=embeddings,
            )
        else:
            manifest["clip"] = {
                "skipped": "disabled by --no-clip" if not clip else "the catalogue has no images"
            }
        if shards:
            from retrieval_service.sharding import write_shards

            log(f"splitting the retrieval indexes into {shards} shards")
            manifest["shards"] = write_shards(set_dir, shards, log)
        manifest.update(
            train_set_rankers(
                catalogue,
                set_dir,
                set_dir,
                keyword_index,
                rankers,
                tune=tune,
                int8=int8,
                show_progress=show_progress,
            )
        )
        manifest["build_seconds"] = round(time.time() - started, 1)
        artifacts.write_manifest(set_dir, manifest)
        artifacts.publish(out, set_dir)
    artifacts.prune(out, keep=keep)
    log(f"artifact set {version} ready in {manifest['build_seconds']}s: {set_dir}")
    return set_dir


def filter_columns(catalogue, log, show_progress: bool = True) -> dict:
    """Give ``catalogue`` its dominant colours (computed from the images when the data has no
    colors table) and return the manifest's record of filter support."""
    if catalogue.colors is not None:
        source = "the colors table"
    elif catalogue.photos["has_image"].any():
        from imgsearch_tools.dominant_colors import colors_from_images

        log("computing dominant colours from the images (the data has no colors table)")
        catalogue.colors = colors_from_images(catalogue, show_progress)
        source = "computed from the images"
    else:
        source = "none: no colors table and no images"
    return {"format": FILTERS_FORMAT, "colors": source}


# What an artifact root holds (imgsearch.artifacts): anything else there is not the store's.
ROOT_ENTRIES = ("sets", "current", "current.tmp")


def train_set_rankers(
    catalogue,
    set_dir: Path,
    retrieval_dir: Path,
    keyword_index,
    rankers: list[str],
    tune: bool = False,
    int8: bool = True,
    show_progress: bool = True,
    kept: dict[str, Path] | None = None,
) -> dict:
    """Train ``rankers`` into ``set_dir/rankers`` and choose the defaults; returns manifest entries.

    The candidates handed to training come from hybrid when the set at ``retrieval_dir`` has
    CLIP, else keyword; the rankers that use image embeddings get the set's. The validation
    slice then chooses the served (retriever, fusion weights, ranker) together
    (:mod:`imgsearch_tools.evaluation.configuration`).

    Returns
    -------
    dict
        ``rankers``, ``rankers_skipped``, ``ranker_candidates``, ``ranker_selection``,
        ``configuration``, ``default_retriever``, ``default_ranker``, ``default_ranker_reason``
        and, with CLIP, ``fusion``.
    """
    from imgsearch import artifacts
    from imgsearch.image_embeddings import ImageEmbeddings
    from ranking_service.selection import format_selection, skipped_selection
    from ranking_service.training import train_rankers

    log = _stage_printer(show_progress)
    if not rankers:
        selection = skipped_selection("no ranker was trained")
        return {
            "rankers": {},
            "ranker_selection": selection,
            "default_ranker": selection["default_ranker"],
            "default_ranker_reason": selection["reason"],
        }
    retrievers = served_retrievers(retrieval_dir, keyword_index)
    candidates = served_candidates(
        catalogue, retrievers.get("hybrid", keyword_index), show_progress
    )
    embeddings_path = Path(retrieval_dir) / artifacts.EMBEDDINGS
    embeddings = ImageEmbeddings.load(embeddings_path) if embeddings_path.exists() else None
    log(f"training rankers: {', '.join(rankers)} (candidates from {candidates.retriever})")
    report = train_rankers(
        catalogue,
        rankers,
        Path(set_dir) / artifacts.RANKERS_DIR,
        candidates,
        tune=tune,
        show_progress=show_progress,
        int8=int8,
        embeddings=embeddings,
        kept=kept,
    )
    for name, reason in report.skipped.items():
        log(f"{name} skipped: {reason}")
    log(format_selection(report.selection))
    entries = {
        "rankers": report.rankers,
        "rankers_skipped": report.skipped,
        "ranker_candidates": candidates_summary(candidates),
        "ranker_selection": report.selection,
        "default_ranker": report.selection["default_ranker"],
        "default_ranker_reason": report.selection["reason"],
    }
    from imgsearch_tools.evaluation.configuration import (
        configuration_entries,
        served_configuration,
    )

    started = time.perf_counter()
    configuration = served_configuration(
        catalogue, report, keyword_index, retrievers.get("clip"), candidates_k=100
    )
    configuration["seconds"] = round(time.perf_counter() - started, 2)
    log(
        f"served configuration: {configuration['label']} + {configuration['ranker']} "
        f"({configuration['rule']}) — {configuration['reason']}"
    )
    entries.update(configuration_entries(configuration))
    return entries


def check_artifact_root(out: str | Path, force: bool = False) -> None:
    """Refuse an ``--out`` folder that holds files other than an artifact store's.

    Raises
    ------
    imgsearch_tools.outputs.RefusedFolder
        ``out`` is a file, or holds other entries than ``sets/`` and ``current`` and
        ``force`` is off; or ``current`` there is not the store's link.
    """
    from imgsearch import artifacts
    from imgsearch_tools.outputs import RefusedFolder

    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise RefusedFolder(f"{out} exists and is not a folder")
    try:
        artifacts.check_root(out)
    except artifacts.ArtifactError as exc:
        raise RefusedFolder(str(exc)) from None
    sets = out / artifacts.SETS_DIR
    if sets.exists() and not sets.is_dir():
        raise RefusedFolder(f"{sets} exists and is not a folder of artifact sets")
    others = sorted(e.name for e in out.iterdir() if e.name not in ROOT_ENTRIES)
    if others and not force:
        raise RefusedFolder(
            f"{out} is not empty and is not an artifact root (it holds "
            f"{', '.join(others[:3])}{' and more' if len(others) > 3 else ''}); give a new or "
            "empty folder, or pass --force to add sets/ and current beside them (nothing "
            "already there is deleted or overwritten)"
        )


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("imgsearch", "torch", "open_clip_torch", "faiss-cpu", "implicit", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _stage_printer(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(f"[imgsearch] {message}", file=sys.stderr, flush=True)

    return log


def cmd_build(args) -> int:
    from imgsearch.artifacts import ArtifactError
    from imgsearch.conversion_store import StoreError
    from imgsearch.data_report import DataError
    from imgsearch_tools.outputs import RefusedFolder
    from retrieval_service.embedding_sets import EmbeddingMismatch

    if args.embeddings and (args.no_clip or not args.clip_model):
        print(
            "error: --embeddings needs the CLIP they were made with: --clip-model NAME "
            "--clip-pretrained TAG|PATH (e.g. --clip-model imgsearch-tiny-clip "
            "--clip-pretrained CLIP_DIR from train-clip), and not --no-clip",
            file=sys.stderr,
        )
        return 2
    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    unknown = sorted(set(rankers) - set(RANKER_NAMES))
    if unknown:
        print(
            f"error: unknown ranker(s) {', '.join(unknown)}; valid: {', '.join(RANKER_NAMES)}",
            file=sys.stderr,
        )
        return 2
    try:
        check_shard_count(args.shards, allow_none=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        build_artifacts(
            args.data,
            args.out,
            rankers,
            tune=args.tune,
            clip=not args.no_clip,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            clip_steps=args.clip_steps,
            index_factory=args.index_factory,
            strict=args.strict,
            keep=args.keep,
            show_progress=not args.quiet,
            int8=args.int8,
            force=args.force,
            embeddings=args.embeddings,
            shards=args.shards,
            tombstones=read_tombstones(SimpleNamespace(artifacts=args.out)),
            catalog_log=read_catalog_changes(SimpleNamespace(artifacts=args.out)),
        )
    except (DataError, FileNotFoundError, ArtifactError, EmbeddingMismatch, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RefusedFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    log = _stage_printer(show_progress)
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


def cmd_train(args) -> int:
    from imgsearch import artifacts
    from imgsearch.conversion_store import StoreError

    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    unknown = sorted(set(rankers) - set(RANKER_NAMES))
    if unknown or not rankers:
        print(
            f"error: unknown ranker(s) {', '.join(unknown) or '(none given)'}; valid: "
            f"{', '.join(RANKER_NAMES)}",
            file=sys.stderr,
        )
        return 2
    try:
        logged = read_logged_events(args) if args.with_logged_events else None
        tombstones = read_tombstones(args)
        retrain_rankers(
            args.artifacts,
            rankers,
            tune=args.tune,
            int8=args.int8,
            keep=args.keep,
            show_progress=not args.quiet,
            logged=logged,
            tombstones=tombstones,
        )
    except (artifacts.ArtifactError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def check_shard_count(shards: int, allow_none: bool = False) -> None:
    """Raise ValueError unless ``shards`` is a shard count (or 0 = none, if allowed)."""
    from retrieval_service.sharding import MAX_SHARDS

    if (allow_none and shards == 0) or 2 <= shards <= MAX_SHARDS:
        return
    raise ValueError(f"--shards must be between 2 and {MAX_SHARDS}, got {shards}")


def reshard(root: str, count: int, keep: int = 3, show_progress: bool = True) -> Path:
    """Publish a new set: the current one's files (hard links) plus ``count`` shards.

    A set that is sharded already is resharded: its shards are left out of the new set.
    """
    from imgsearch import artifacts
    from retrieval_service.sharding import SHARDS_DIR, write_shards

    check_shard_count(count)
    current = current_set(root)
    log = _stage_printer(show_progress)
    fingerprint = current.manifest.get("data_fingerprint", "")
    with artifacts.writing_set(root, fingerprint) as (set_dir, version):
        artifacts.link_tree(current.path, set_dir, skip=(artifacts.MANIFEST, SHARDS_DIR))
        log(f"splitting the retrieval indexes of {current.version} into {count} shards")
        layout = write_shards(set_dir, count, log)
        manifest = {
            **current.manifest,
            "version": version,
            "parent_version": current.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": layout,
        }
        artifacts.write_manifest(set_dir, manifest)
        artifacts.publish(root, set_dir)
    artifacts.prune(root, keep=keep)
    log(f"artifact set {version} ({count} retrieval shards) ready: {set_dir}")
    return set_dir


def cmd_shard(args) -> int:
    from imgsearch import artifacts

    try:
        reshard(args.artifacts, args.shards, keep=args.keep, show_progress=not args.quiet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except artifacts.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
