"""CatalogService on the gateway: photos written to and taken down from the live catalogue.

A batch is checked whole (any bad photo refuses all of it, INVALID_ARGUMENT naming the photo),
its images are embedded once by a retrieval server's CLIP image tower, and it is committed to
the catalogue log in the conversion store (:mod:`imgsearch.catalog_log`) before it is
acknowledged. Retrieval servers tail the log; the gateway tails it too, for the photos' metadata
in search results and for FeedbackService to accept conversions of live photos.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re

import grpc

from imgsearch import artifacts
from imgsearch.catalog.v1 import catalog_service_pb2 as pb
from imgsearch.catalog.v1 import catalog_service_pb2_grpc as pb_grpc
from imgsearch.catalog_log import (
    DELETE,
    UPSERT,
    CatalogLog,
    PhotoChange,
    RequestConflict,
    request_digest,
)
from imgsearch.catalogue import normalise_keyword
from imgsearch.conversion_store import StoreError
from imgsearch.conversion_store.background import BackgroundStore
from imgsearch.retrieval.v1 import retrieval_service_pb2 as retr_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2_grpc as retr_grpc
from imgsearch.search.v1 import search_service_pb2 as search_pb
from imgsearch.serving import InvalidArgument

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CatalogService"].full_name
MAX_PHOTOS_PER_BATCH = 64
# Images per batch in all: under the server's 4 MiB message limit with the other fields.
MAX_BATCH_IMAGE_BYTES = 3 * 1024 * 1024
MAX_DELETES_PER_BATCH = 1000
MAX_KEYWORDS = 64
MAX_KEYWORD_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_DESCRIPTION_CHARS = 2000
MAX_PHOTOGRAPHER_CHARS = 128
MAX_REASON_CHARS = 500
PHOTO_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
EMBED_TIMEOUT_S = 60.0
# A retrieval target that is down or shedding load: the images go to the next target.
FAIL_OVER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
logger = logging.getLogger("imgsearch.catalog")


def check_request_id(request_id: str) -> None:
    """Raises InvalidArgument unless the request id is 1 to 128 printable characters."""
    if not request_id:
        raise InvalidArgument("request_id", "must not be empty")
    if len(request_id) > MAX_REQUEST_ID_CHARS or "\x00" in request_id:
        raise InvalidArgument(
            "request_id", f"must be 1 to {MAX_REQUEST_ID_CHARS} characters without NUL"
        )


def check_photo_id(field: str, photo_id: str) -> None:
    """Raises InvalidArgument naming ``field`` for an id outside ``[A-Za-z0-9_-]{1,128}``."""
    if not PHOTO_ID.fullmatch(photo_id):
        raise InvalidArgument(
            field, f"{photo_id[:140]!r} must be 1 to 128 letters, digits, '-' or '_'"
        )


def check_image(field: str, image: bytes) -> None:
    """Raises InvalidArgument naming ``field`` unless ``image`` decodes as a JPEG or PNG."""
    from PIL import Image, UnidentifiedImageError

    if not image:
        raise InvalidArgument(field, "must hold the image's JPEG or PNG bytes")
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            if decoded.format not in ("JPEG", "PNG"):
                raise InvalidArgument(field, f"is {decoded.format}, not JPEG or PNG")
            decoded.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(field, f"is not a readable JPEG or PNG ({exc})") from exc


def photo_record(photo: pb.PhotoRecord, field: str) -> dict:
    """The log record of one photo (everything but the image), checked field by field.

    Raises
    ------
    InvalidArgument
        Naming the field, e.g. ``photos[2].keywords[0].confidence`` (the message names the
        photo id).
    """
    if not 1 <= len(photo.keywords) <= MAX_KEYWORDS:
        raise InvalidArgument(f"{field}.keywords", f"must hold 1 to {MAX_KEYWORDS} keywords")
    keywords = []
    for j, item in enumerate(photo.keywords):
        keyword = normalise_keyword(item.keyword)
        if not keyword or len(keyword) > MAX_KEYWORD_CHARS or "\x00" in keyword:
            raise InvalidArgument(
                f"{field}.keywords[{j}].keyword",
                f"must be 1 to {MAX_KEYWORD_CHARS} characters without NUL",
            )
        if not (math.isfinite(item.confidence) and 0 <= item.confidence <= 100):
            raise InvalidArgument(
                f"{field}.keywords[{j}].confidence", f"must be in [0, 100], got {item.confidence}"
            )
        keywords.append([keyword, float(item.confidence)])
    for name, value, limit in (
        ("description", photo.description, MAX_DESCRIPTION_CHARS),
        ("photographer", photo.photographer, MAX_PHOTOGRAPHER_CHARS),
    ):
        if len(value) > limit or "\x00" in value:
            raise InvalidArgument(
                f"{field}.{name}", f"must be at most {limit} characters without NUL"
            )
    for name in ("width", "height", "views", "downloads"):
        if getattr(photo, name) < 0:
            raise InvalidArgument(f"{field}.{name}", "must not be negative")
    return {
        "keywords": keywords,
        "description": photo.description,
        "photographer": photo.photographer,
        "width": photo.width,
        "height": photo.height,
        "views": photo.views,
        "downloads": photo.downloads,
    }


def check_upsert(request: pb.UpsertPhotosRequest) -> list[dict]:
    """Check a whole batch; returns the photos' records in order.

    Raises
    ------
    InvalidArgument
        For the first problem found, naming the photo; nothing of the batch is applied.
    """
    check_request_id(request.request_id)
    n = len(request.photos)
    if not 1 <= n <= MAX_PHOTOS_PER_BATCH:
        raise InvalidArgument("photos", f"must hold 1 to {MAX_PHOTOS_PER_BATCH} photos, got {n}")
    total = sum(len(p.image) for p in request.photos)
    if total > MAX_BATCH_IMAGE_BYTES:
        raise InvalidArgument(
            "photos",
            f"images total {total:,} bytes, more than {MAX_BATCH_IMAGE_BYTES:,} per batch: "
            "split the batch",
        )
    records, seen = [], set()
    for i, photo in enumerate(request.photos):
        field = f"photos[{i}]"
        check_photo_id(f"{field}.photo_id", photo.photo_id)
        if photo.photo_id in seen:
            raise InvalidArgument(
                f"{field}.photo_id", f"photo {photo.photo_id!r} appears twice in the batch"
            )
        seen.add(photo.photo_id)
        try:
            check_image(f"{field}.image", photo.image)
            records.append(photo_record(photo, field))
        except InvalidArgument as exc:
            raise InvalidArgument(exc.field, f"photo {photo.photo_id!r}: {exc.description}")
    return records


def check_delete(request: pb.DeletePhotosRequest) -> None:
    """Raises InvalidArgument naming the field (and photo) of a bad deletion batch."""
    check_request_id(request.request_id)
    n = len(request.photo_ids)
    if not 1 <= n <= MAX_DELETES_PER_BATCH:
        raise InvalidArgument("photo_ids", f"must hold 1 to {MAX_DELETES_PER_BATCH} ids, got {n}")
    for i, photo_id in enumerate(request.photo_ids):
        check_photo_id(f"photo_ids[{i}]", photo_id)
    if len(request.reason) > MAX_REASON_CHARS or "\x00" in request.reason:
        raise InvalidArgument("reason", f"must be at most {MAX_REASON_CHARS} characters")


def search_photo(change: PhotoChange) -> search_pb.Photo:
    """The metadata search results show for a live photo."""
    record = change.record
    keywords = sorted(record.get("keywords", []), key=lambda kc: -kc[1])
    return search_pb.Photo(
        photo_id=change.photo_id,
        description=record.get("description", ""),
        photographer_username=record.get("photographer", ""),
        keywords=[k for k, _ in keywords[:8]],
    )


def _committed(store, request_id: str, digest: str):
    return CatalogLog(store).committed(request_id, digest)


def _append(store, request_id: str, digest: str, changes):
    return CatalogLog(store).append(request_id, digest, changes)


def _latest(store, photo_id: str):
    return CatalogLog(store).latest(photo_id)


def _since(store, seq: int):
    return CatalogLog(store).since(seq)


class CatalogServicer(pb_grpc.CatalogServiceServicer):
    """Serves the live catalogue's writes over the gateway's conversion store.

    Parameters
    ----------
    store:
        The gateway's store (shared with FeedbackService).
    holder:
        The gateway's state; its ``photos`` gain the live photos and lose the deleted ones.
    retrieval_channels:
        The channels to the retrieval targets (one per shard), in the order tried: a server of
        the first embeds the images with its CLIP, the next one when that target is down.
    poll_s:
        How often the log is read for the metadata of photos written elsewhere.
    enabled:
        Whether the live catalogue is served (``IMGSEARCH_LIVE_CATALOGUE``); when not, every
        method answers FAILED_PRECONDITION and the log is not read.
    """

    def __init__(
        self,
        store: BackgroundStore,
        holder,
        retrieval_channels,
        poll_s: float = 0.2,
        enabled: bool = True,
    ):
        self.store = store
        self.holder = holder
        self.retrievals = [retr_grpc.RetrievalServiceStub(c) for c in retrieval_channels]
        self.poll_s = poll_s
        self.enabled = enabled
        self.applied: tuple[object, int] = (None, 0)
        self.task = asyncio.get_running_loop().create_task(self._tail()) if enabled else None

    async def close(self) -> None:
        if self.task is None:
            return
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def _check_enabled(self, context) -> None:
        if not self.enabled:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the live catalogue is off on this gateway: serve with --live-catalogue "
                "(IMGSEARCH_LIVE_CATALOGUE=1) to write photos",
            )

    async def _unavailable(self, context, action: str, exc: StoreError) -> None:
        logger.warning(f"catalogue log {action} failed", extra={"error": str(exc)})
        written = "nothing of this batch was written, " if action == "write" else ""
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the catalogue log's store is unavailable ({exc}); {written}retry",
        )

    async def _tail(self) -> None:
        while True:
            try:
                await self.catch_up()
            except StoreError as exc:
                logger.debug("catalogue log unreadable", extra={"error": str(exc)})
            await asyncio.sleep(self.poll_s)

    async def catch_up(self) -> None:
        """Apply the log's new changes to the served photos' metadata."""
        state = self.holder.state
        if state is None:
            return
        applied_state, seq = self.applied
        if applied_state is not state:  # a new set: replay from its high-water mark
            manifest = artifacts.resolve(str(state.path)).manifest
            seq = int(manifest.get("catalog_log_seq", 0))
        while changes := await self.store.call(_since, seq):
            for change in changes:
                if change.operation == DELETE:
                    state.photos.pop(change.photo_id, None)
                else:
                    state.photos[change.photo_id] = search_photo(change)
            seq = changes[-1].seq
        self.applied = (state, seq)

    async def _embed(self, context, images: list[bytes]) -> list:
        request = retr_pb.EmbedImagesRequest(images=images)
        for target, retrieval in enumerate(self.retrievals):
            try:
                reply = await retrieval.EmbedImages(request, timeout=EMBED_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return [None] * len(images)  # a set without CLIP: keyword search only
                logger.warning(
                    "image embedding failed",
                    extra={"target": target, "code": exc.code().name, "error": exc.details()},
                )
                if exc.code() in FAIL_OVER:
                    continue  # every target serves the set's CLIP: the next one embeds
                break
            import numpy as np

            values = np.asarray(reply.values, np.float32).reshape(len(images), reply.dim)
            return list(values)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the images could not be embedded; nothing of this batch was written, retry it",
        )

    async def _commit(self, context, request_id: str, digest: str, changes) -> tuple[int, bool]:
        try:
            return await self.store.call(_append, request_id, digest, changes)
        except RequestConflict as exc:
            raise InvalidArgument("request_id", str(exc)) from exc
        except StoreError as exc:
            await self._unavailable(context, "write", exc)

    async def _already(self, context, request_id: str, digest: str) -> int | None:
        try:
            return await self.store.call(_committed, request_id, digest)
        except RequestConflict as exc:
            raise InvalidArgument("request_id", str(exc)) from exc
        except StoreError as exc:
            await self._unavailable(context, "read", exc)

    async def UpsertPhotos(
        self, request: pb.UpsertPhotosRequest, context
    ) -> pb.UpsertPhotosResponse:
        await self._check_enabled(context)
        # Decoding every image to check it takes milliseconds per photo: beside the event
        # loop, so searches are not held behind a batch of writes.
        records = await asyncio.to_thread(check_upsert, request)
        digest = request_digest(request.SerializeToString(deterministic=True))
        done = await self._already(context, request.request_id, digest)
        if done is not None:
            return pb.UpsertPhotosResponse(sequence=done, duplicate=True)
        vectors = await self._embed(context, [p.image for p in request.photos])
        changes = [
            PhotoChange(photo.photo_id, UPSERT, record, vector)
            for photo, record, vector in zip(request.photos, records, vectors)
        ]
        seq, duplicate = await self._commit(context, request.request_id, digest, changes)
        return pb.UpsertPhotosResponse(sequence=seq, duplicate=duplicate)

    async def DeletePhotos(
        self, request: pb.DeletePhotosRequest, context
    ) -> pb.DeletePhotosResponse:
        await self._check_enabled(context)
        check_delete(request)
        digest = request_digest(request.SerializeToString(deterministic=True))
        changes = [
            PhotoChange(photo_id, DELETE, {"reason": request.reason})
            for photo_id in dict.fromkeys(request.photo_ids)
        ]
        seq, duplicate = await self._commit(context, request.request_id, digest, changes)
        return pb.DeletePhotosResponse(sequence=seq, duplicate=duplicate)

    async def GetPhoto(self, request: pb.GetPhotoRequest, context) -> pb.GetPhotoResponse:
        await self._check_enabled(context)
        check_photo_id("photo_id", request.photo_id)
        try:
            change = await self.store.call(_latest, request.photo_id)
        except StoreError as exc:
            await self._unavailable(context, "read", exc)
        if change is not None and change.operation == DELETE:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"photo {request.photo_id!r} was taken down"
            )
        if change is not None:
            record = change.record
            photo = pb.PhotoRecord(
                photo_id=change.photo_id,
                keywords=[
                    pb.KeywordConfidence(keyword=k, confidence=c) for k, c in record["keywords"]
                ],
                **{
                    name: record[name]
                    for name in ("description", "photographer", "width", "height")
                },
                views=record["views"],
                downloads=record["downloads"],
            )
            return pb.GetPhotoResponse(photo=photo, sequence=change.seq)
        served = self.holder.state.photos.get(request.photo_id)
        if served is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"photo {request.photo_id!r} is not in the catalogue"
            )
        return pb.GetPhotoResponse(
            photo=pb.PhotoRecord(
                photo_id=served.photo_id,
                description=served.description,
                photographer=served.photographer_username,
                keywords=[pb.KeywordConfidence(keyword=k) for k in served.keywords],
            )
        )
