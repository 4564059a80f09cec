"""`imgsearch catalog add|delete|get` and `imgsearch ingest`: the live catalogue's clients.

Both go through the gateway's CatalogService, the same API as any client. `ingest` reads a
folder in the Unsplash Lite layout (``photos.tsv*``, ``keywords.tsv*``, ``images/<id>.jpg``)
and writes it in batches kept under the API's count and byte limits. Each batch's request id is
a digest of its content, so running `ingest` again on the same folder writes nothing twice.
"""

from __future__ import annotations

import hashlib
import sys
import uuid
from pathlib import Path

from imgsearch_tools.client_flags import add_client_security_arguments, client_security

# The API's limits (gateway.catalog): 64 photos and 3 MiB of images per batch.
BATCH_PHOTOS = 64
BATCH_IMAGE_BYTES = 3 * 1024 * 1024


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("catalog", help="add, take down or read one photo of the catalogue")
    actions = p.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="add, delete or get"
    )
    add = actions.add_parser("add", help="add or replace a photo (image embedded at write)")
    add.add_argument("photo_id", help="the photo's id (letters, digits, '-', '_')")
    add.add_argument("--image", required=True, help="the image file (JPEG or PNG)")
    add.add_argument(
        "--keyword",
        action="append",
        required=True,
        help="KEYWORD or KEYWORD=CONFIDENCE (0-100, default 100); repeat for each keyword",
    )
    add.add_argument("--description", default="", help="the photo's description")
    add.add_argument("--photographer", default="", help="the photographer's user name")
    delete = actions.add_parser("delete", help="take photos down (never returned again)")
    delete.add_argument("photo_ids", nargs="+", help="the photos' ids")
    delete.add_argument("--reason", default="", help="why (kept in the change log)")
    get = actions.add_parser("get", help="print a photo's record in the catalogue")
    get.add_argument("photo_id", help="the photo's id")
    for sub in (add, delete, get):
        _client_arguments(sub)
        sub.set_defaults(handler=cmd_catalog)

    p = subparsers.add_parser(
        "ingest",
        help="write a folder of photos (Unsplash Lite tables + images/) to the live catalogue",
    )
    p.add_argument("folder", help="a folder with photos.tsv*, keywords.tsv* and images/")
    _client_arguments(p)
    p.set_defaults(handler=cmd_ingest)


def _client_arguments(p) -> None:
    p.add_argument("--target", default=None, help="gateway HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call in seconds")
    add_client_security_arguments(p)


def _stub(args):
    from imgsearch.catalog.v1 import catalog_service_pb2_grpc as cat_grpc
    from imgsearch.config import env_int

    target = args.target or f"127.0.0.1:{env_int('GATEWAY_PORT', 50051)}"
    security = client_security(args)
    channel = security.channel(target)
    return channel, cat_grpc.CatalogServiceStub(channel), security.metadata()


def keyword_confidence(text: str):
    """``KEYWORD`` or ``KEYWORD=CONFIDENCE`` as a KeywordConfidence."""
    from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb

    keyword, sep, value = text.rpartition("=") if "=" in text else (text, "", "100")
    try:
        confidence = float(value)
    except ValueError:
        raise SystemExit(f"error: --keyword {text!r}: confidence {value!r} is not a number")
    return cat_pb.KeywordConfidence(keyword=keyword, confidence=confidence)


def cmd_catalog(args) -> int:
    import grpc
    from google.protobuf import json_format

    from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb

    channel, stub, metadata = _stub(args)
    call = {"timeout": args.timeout, "metadata": metadata}
    try:
        with channel:
            if args.action == "add":
                photo = cat_pb.PhotoRecord(
                    photo_id=args.photo_id,
                    image=Path(args.image).read_bytes(),
                    keywords=[keyword_confidence(k) for k in args.keyword],
                    description=args.description,
                    photographer=args.photographer,
                )
                reply = stub.UpsertPhotos(
                    cat_pb.UpsertPhotosRequest(request_id=str(uuid.uuid4()), photos=[photo]),
                    **call,
                )
                print(f"written: {args.photo_id} at log sequence {reply.sequence}")
            elif args.action == "delete":
                reply = stub.DeletePhotos(
                    cat_pb.DeletePhotosRequest(
                        request_id=str(uuid.uuid4()), photo_ids=args.photo_ids, reason=args.reason
                    ),
                    **call,
                )
                print(f"taken down: {len(args.photo_ids)} at log sequence {reply.sequence}")
            else:
                reply = stub.GetPhoto(cat_pb.GetPhotoRequest(photo_id=args.photo_id), **call)
                print(json_format.MessageToJson(reply))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def read_folder(folder: Path):
    """The folder's photos (one row each) and keywords, as Unsplash Lite tables."""
    import pandas as pd

    def table(pattern: str, required: set[str]):
        files = sorted(folder.glob(pattern))
        if not files:
            raise SystemExit(f"error: {folder} has no {pattern} file")
        frame = pd.concat(pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False) for f in files)
        missing = required - set(frame.columns)
        if missing:
            raise SystemExit(f"error: {files[0]}: missing column(s) {', '.join(sorted(missing))}")
        return frame

    photos = table("photos.tsv*", {"photo_id"})
    keywords = table("keywords.tsv*", {"photo_id", "keyword"})
    return photos, keywords


def photo_records(folder: Path):
    """One PhotoRecord per photo of the folder that has an image, with its keywords."""
    from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb

    photos, keywords = read_folder(folder)
    confidence = keywords.get("ai_service_1_confidence")
    keywords = keywords.assign(confidence=confidence if confidence is not None else "100")
    by_photo = keywords.groupby("photo_id")
    for row in photos.itertuples(index=False):
        image = folder / "images" / f"{row.photo_id}.jpg"
        if not image.exists() or row.photo_id not in by_photo.groups:
            print(f"skipped {row.photo_id}: no image or no keyword", file=sys.stderr)
            continue
        group = by_photo.get_group(row.photo_id)

        def number(name: str) -> int:
            value = getattr(row, name, "") or "0"
            return int(float(value))

        yield cat_pb.PhotoRecord(
            photo_id=row.photo_id,
            image=image.read_bytes(),
            keywords=[
                cat_pb.KeywordConfidence(keyword=k, confidence=float(c or 0))
                for k, c in zip(group["keyword"], group["confidence"])
            ],
            description=getattr(row, "photo_description", ""),
            photographer=getattr(row, "photographer_username", ""),
            width=number("photo_width"),
            height=number("photo_height"),
            views=number("stats_views"),
            downloads=number("stats_downloads"),
        )


def batches(records):
    """Records grouped under the API's limits (count and image bytes)."""
    batch, size = [], 0
    for record in records:
        if batch and (len(batch) == BATCH_PHOTOS or size + len(record.image) > BATCH_IMAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += len(record.image)
    if batch:
        yield batch


def cmd_ingest(args) -> int:
    import grpc
    from tqdm import tqdm

    from imgsearch.catalog.v1 import catalog_service_pb2 as cat_pb

    folder = Path(args.folder)
    channel, stub, metadata = _stub(args)
    written = duplicates = 0
    with channel, tqdm(unit="photo", file=sys.stderr, desc="ingest") as progress:
        for batch in batches(photo_records(folder)):
            digest = hashlib.sha256()
            for record in batch:
                digest.update(record.SerializeToString(deterministic=True))
            request = cat_pb.UpsertPhotosRequest(
                request_id=f"ingest-{digest.hexdigest()[:32]}", photos=batch
            )
            try:
                reply = stub.UpsertPhotos(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                print(f"{written} photos written before the error", file=sys.stderr)
                return 1
            if reply.duplicate:
                duplicates += len(batch)
            else:
                written += len(batch)
            progress.update(len(batch))
    print(f"written: {written} photos; already written earlier: {duplicates}")
    return 0
