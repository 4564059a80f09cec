"""`imgsearch build`: one versioned artifact set from a catalogue."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from imgsearch.filters import FILTERS_FORMAT
from imgsearch.filters import MANIFEST_KEY as FILTERS_KEY
from imgsearch_tools.offline_candidates import (
    candidates_summary,
    served_candidates,
    served_retrievers,
)
from retrieval_service.clip_model import TRAIN_STEPS


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
    from imgsearch_tools.build_steps import BuildSteps
    from retrieval_service.keyword_index import KeywordIndex

    started = time.time()
    check_shard_count(shards, allow_none=True)
    check_artifact_root(out, force)
    log = stage_printer(show_progress)
    steps = BuildSteps(log)
    log(f"reading {data}")
    with steps.step("read"):
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
        with steps.step("filters and catalogue"):
            manifest[FILTERS_KEY] = filter_columns(catalogue, log, show_progress)
            catalogue.save(set_dir / artifacts.CATALOGUE_DIR)
        log("building keyword index")
        with steps.step("keyword index"):
            keyword_index = KeywordIndex.from_keywords(catalogue.keywords)
            keyword_index.save(set_dir / artifacts.KEYWORD_INDEX)
        if clip and catalogue.photos["has_image"].any():
            from imgsearch_tools.demo_data import query_families
            from retrieval_service.clip_artifacts import build_clip_artifacts
            from retrieval_service.clip_model import ClipSpec

            spec = ClipSpec(clip_model, clip_pretrained) if clip_model else None
            log("CLIP: " + (f"{clip_model} ({clip_pretrained})" if spec else "training tiny CLIP"))
            with steps.step("clip"):
                manifest["clip"] = build_clip_artifacts(
                    catalogue,
                    set_dir,
                    spec,
                    factory=index_factory,
                    train_steps=clip_steps,
                    show_progress=show_progress,
                    query_families=query_families(catalogue),
                    embeddings=embeddings,
                    step=steps.step,
                )
        else:
            manifest["clip"] = {
                "skipped": "disabled by --no-clip" if not clip else "the catalogue has no images"
            }
        if shards:
            from retrieval_service.sharding import write_shards

            log(f"splitting the retrieval indexes into {shards} shards")
            with steps.step("shards"):
                manifest["shards"] = write_shards(set_dir, shards, log)
        with steps.step("rankers"):
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
        manifest["build_steps"] = steps.steps
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

    log = stage_printer(show_progress)
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
    if "rule" in report.rankers.get("stacked", {}):
        log(f"stacked: {report.rankers['stacked']['rule']['reason']}")
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


def stage_printer(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(f"[imgsearch] {message}", file=sys.stderr, flush=True)

    return log


def check_shard_count(shards: int, allow_none: bool = False) -> None:
    """Raise ValueError unless ``shards`` is a shard count (or 0 = none, if allowed)."""
    from retrieval_service.sharding import MAX_SHARDS

    if (allow_none and shards == 0) or 2 <= shards <= MAX_SHARDS:
        return
    raise ValueError(f"--shards must be between 2 and {MAX_SHARDS}, got {shards}")
