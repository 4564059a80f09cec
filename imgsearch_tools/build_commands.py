"""The `build`, `train` and `shard` commands: their arguments and their handlers."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from imgsearch.config import DEFAULT_ARTIFACTS
from imgsearch.names import RANKER_NAMES, check_names
from imgsearch_tools.build import build_artifacts, check_shard_count
from imgsearch_tools.build_inputs import read_catalog_changes, read_logged_events, read_tombstones
from imgsearch_tools.conversions import add_store_arguments
from imgsearch_tools.reshard import reshard
from imgsearch_tools.retrain import retrain_rankers
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
        help="FAISS factory string (default: Flat below 50k photos, else IVF<lists>,SQfp16 "
        "with about 4·sqrt(photos) lists of half-precision vectors and its nprobe calibrated)",
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
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root (with current)")
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
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact root (with current)")
    p.add_argument("--shards", type=int, required=True, help="number of shards (2 or more)")
    p.add_argument("--keep", type=int, default=3, help="complete sets to keep, as for build")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=cmd_shard)


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
    try:
        rankers = check_names(args.rankers.split(","), RANKER_NAMES, "ranker")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
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


def cmd_train(args) -> int:
    from imgsearch import artifacts
    from imgsearch.conversion_store import StoreError

    try:
        rankers = check_names(args.rankers.split(","), RANKER_NAMES, "ranker")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
