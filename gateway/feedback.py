"""FeedbackService on the gateway: conversions logged durably, checked one event at a time."""

from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Counter

from imgsearch.catalogue import normalise_keyword, normalise_user_id
from imgsearch.config import MAX_QUERY_CHARS, MAX_USER_ID_CHARS
from imgsearch.conversion_store import DEFAULT_CONVERSION_TYPE, ConversionEvent, Outcome, StoreError
from imgsearch.conversion_store.background import BackgroundStore
from imgsearch.feedback.v1 import feedback_service_pb2 as pb
from imgsearch.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from imgsearch.serving.errors import InvalidArgument

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name
MAX_EVENTS_PER_BATCH = 1000
MAX_EVENT_ID_CHARS = 128
MAX_PHOTO_ID_CHARS = 128
MAX_COUNTRY_CHARS = 64
TEXT_FIELDS = ("event_id", "user_id", "photo_id", "query", "country")
# Clocks of clients and servers disagree a little; a conversion further ahead is a bug.
FUTURE_TOLERANCE_S = 300
CONVERSION_TYPES = {
    pb.CONVERSION_TYPE_UNSPECIFIED: DEFAULT_CONVERSION_TYPE,
    pb.CONVERSION_TYPE_DOWNLOAD: "download",
}
EVENTS = Counter(
    "imgsearch_conversion_events_total",
    "Conversion events received by FeedbackService, by outcome (stored, duplicate, rejected).",
    ["outcome"],
)
logger = logging.getLogger("imgsearch.feedback")


def check_lengths(request: pb.LogConversionsRequest) -> None:
    """Refuse the whole request for an empty or oversized batch or an oversized field.

    Raises
    ------
    InvalidArgument
        Naming the field, e.g. ``events[3].query``.
    """
    n = len(request.events)
    if n == 0:
        raise InvalidArgument("events", "must not be empty")
    if n > MAX_EVENTS_PER_BATCH:
        raise InvalidArgument("events", f"at most {MAX_EVENTS_PER_BATCH} per call, got {n}")
    for i, event in enumerate(request.events):
        for name, value, limit in (
            ("event_id", event.event_id, MAX_EVENT_ID_CHARS),
            ("user_id", event.user_id, MAX_USER_ID_CHARS),
            ("photo_id", event.photo_id, MAX_PHOTO_ID_CHARS),
            ("query", event.query, MAX_QUERY_CHARS),
            ("country", event.country, MAX_COUNTRY_CHARS),
        ):
            if len(value) > limit:
                if name == "query" and len(normalise_keyword(value)) <= limit:
                    continue  # the limit is on the normalised query, as for Search
                raise InvalidArgument(
                    f"events[{i}].{name}", f"must be at most {limit} characters, got {len(value)}"
                )


def check_event(
    event: pb.ConversionEvent, photos, latest_us: int
) -> tuple[ConversionEvent | None, int, str]:
    """Turn one event into a store record, or say why it is rejected.

    Returns ``(record, 0, "")`` for a valid event, else ``(None, rejection_reason, detail)``.
    ``photos`` holds the served catalogue's photo ids; ``latest_us`` is the latest acceptable
    ``converted_at`` in microseconds.
    """
    if not event.event_id:
        return None, pb.REJECTION_REASON_MISSING_EVENT_ID, "event_id is empty"
    for name in TEXT_FIELDS:
        if "\x00" in getattr(event, name):
            # PostgreSQL text cannot hold NUL: stored, it would fail the batch at every retry.
            return None, pb.REJECTION_REASON_INVALID_TEXT, f"{name} contains a NUL character"
    user_id = normalise_user_id(event.user_id)
    if not user_id:
        return None, pb.REJECTION_REASON_EMPTY_USER, "user_id is empty"
    conversion_type = CONVERSION_TYPES.get(event.conversion_type)
    if conversion_type is None:
        return (
            None,
            pb.REJECTION_REASON_UNKNOWN_CONVERSION_TYPE,
            f"conversion_type {event.conversion_type} is not a known value",
        )
    if not event.HasField("converted_at"):
        return None, pb.REJECTION_REASON_MISSING_TIME, "converted_at is not set"
    seconds, nanos = event.converted_at.seconds, event.converted_at.nanos
    if seconds < 0 or not 0 <= nanos < 1_000_000_000:
        return (
            None,
            pb.REJECTION_REASON_INVALID_TIME,
            f"converted_at ({seconds} s, {nanos} ns) is before 1970 or not a valid timestamp",
        )
    converted_at_us = seconds * 1_000_000 + nanos // 1000
    if converted_at_us > latest_us:
        ahead = (converted_at_us - latest_us) / 1e6 + FUTURE_TOLERANCE_S
        return (
            None,
            pb.REJECTION_REASON_FUTURE_TIME,
            f"converted_at is {ahead:.0f} s ahead of the server's clock "
            f"(at most {FUTURE_TOLERANCE_S} s allowed)",
        )
    if event.photo_id not in photos:
        return (
            None,
            pb.REJECTION_REASON_UNKNOWN_PHOTO,
            f"photo_id {event.photo_id!r} is not in the served catalogue",
        )
    record = ConversionEvent(
        event_id=event.event_id,
        user_id=user_id,
        photo_id=event.photo_id,
        keyword=normalise_keyword(event.query),
        converted_at_us=converted_at_us,
        country=event.country.strip(),
        conversion_type=conversion_type,
    )
    return record, 0, ""


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    """Serves ``LogConversions`` and ``DeleteUserEvents`` over one conversion store.

    ``holder.state.photos`` is the served catalogue (photo id -> metadata): events of photos
    outside it are rejected, since no model could use them. ``catch_up`` (the live catalogue's
    reader of the change log, when it is on) is awaited before an event is rejected for its
    photo, so a photo acknowledged by any gateway takes conversions at once.
    """

    def __init__(self, store: BackgroundStore, holder, catch_up=None):
        self.store = store
        self.holder = holder
        self.catch_up = catch_up
        self.stored = EVENTS.labels("stored")
        self.duplicate = EVENTS.labels("duplicate")
        self.rejected = EVENTS.labels("rejected")

    async def close(self) -> None:
        await self.store.close()

    async def LogConversions(
        self, request: pb.LogConversionsRequest, context
    ) -> pb.LogConversionsResponse:
        check_lengths(request)
        photos = self.holder.state.photos
        if self.catch_up is not None and any(e.photo_id not in photos for e in request.events):
            try:
                await self.catch_up()
            except StoreError as exc:  # the events are then judged on the photos known so far
                logger.warning("catalogue log unreadable", extra={"error": str(exc)})
            photos = self.holder.state.photos
        latest_us = time.time_ns() // 1000 + FUTURE_TOLERANCE_S * 1_000_000
        response = pb.LogConversionsResponse()
        results = response.results
        valid: list[ConversionEvent] = []
        positions: list[int] = []
        for i, event in enumerate(request.events):
            record, reason, detail = check_event(event, photos, latest_us)
            if record is None:
                results.add(
                    event_id=event.event_id,
                    status=pb.EVENT_STATUS_REJECTED,
                    rejection_reason=reason,
                    detail=detail,
                )
            else:
                results.add(event_id=event.event_id)
                valid.append(record)
                positions.append(i)
        if valid:
            try:
                outcomes = await self.store.append(valid)
            except StoreError as exc:
                # Where the store is and why it failed (paths, hosts, users) is for the log.
                logger.warning("conversion store write failed", extra={"error": str(exc)})
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the conversion store is unavailable; no event of this batch was stored, "
                    "retry it",
                )
            for i, outcome in zip(positions, outcomes):
                result = results[i]
                if outcome is Outcome.STORED:
                    result.status = pb.EVENT_STATUS_STORED
                elif outcome is Outcome.DUPLICATE:
                    result.status = pb.EVENT_STATUS_DUPLICATE
                else:
                    result.status = pb.EVENT_STATUS_REJECTED
                    result.rejection_reason = pb.REJECTION_REASON_CONFLICTING_DUPLICATE
                    result.detail = "an event with this id and other content is already stored"
        stored = sum(o is Outcome.STORED for o in outcomes) if valid else 0
        duplicate = sum(o is Outcome.DUPLICATE for o in outcomes) if valid else 0
        response.stored_count = stored
        response.duplicate_count = duplicate
        response.rejected_count = len(request.events) - stored - duplicate
        self.stored.inc(stored)
        self.duplicate.inc(duplicate)
        self.rejected.inc(response.rejected_count)
        return response

    async def DeleteUserEvents(
        self, request: pb.DeleteUserEventsRequest, context
    ) -> pb.DeleteUserEventsResponse:
        user_id = normalise_user_id(request.user_id)
        if not user_id:
            raise InvalidArgument("user_id", "must not be empty")
        if len(request.user_id) > MAX_USER_ID_CHARS:
            raise InvalidArgument("user_id", f"must be at most {MAX_USER_ID_CHARS} characters")
        if "\x00" in user_id:
            raise InvalidArgument("user_id", "must not contain a NUL character")
        try:
            deleted = await self.store.call("delete_user", user_id)
        except StoreError as exc:
            logger.warning("conversion store delete failed", extra={"error": str(exc)})
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the conversion store is unavailable; nothing was deleted, retry it",
            )
        logger.info("user events deleted", extra={"count": deleted})
        # The same answer whether the user had events or not.
        return pb.DeleteUserEventsResponse()
