"""Photo filters: a request's ``PhotoFilter`` checked against a set's photo attributes into a mask.

An artifact set built with filter support records ``filters`` in its manifest (the format and
where the colours came from) and keeps, in its catalogue, each photo's width, height, featured
flag and submission time (``photos.parquet``) and dominant colours (``colors.parquet``). A set
built before that loads without :class:`PhotoAttributes`; a filtered request to it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import COLOR_COLUMNS, normalise_keyword, with_filter_columns
from imgsearch.retrieval.v1 import retrieval_service_pb2 as pb
from imgsearch.serving.errors import InvalidArgument

# The manifest key and format of filter support (a set without the key refuses filters).
MANIFEST_KEY = "filters"
FILTERS_FORMAT = 1
# Width and height within this share of the longer side make a photo square.
SQUARE_TOLERANCE = 0.01
# At most this many colours or photographers in one filter.
MAX_FILTER_VALUES = 1000
# google.protobuf.Timestamp's valid range (0001-01-01 to 9999-12-31), in seconds.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_INT64 = np.iinfo(np.int64)
UNKNOWN_ORIENTATION = 0


class FiltersUnsupported(Exception):
    """A filtered request to an artifact set built before filters existed."""


def orientation_of(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """The ``Orientation`` value of each photo (0 where its size is unknown)."""
    width = np.asarray(width, np.int64)
    height = np.asarray(height, np.int64)
    known = (width > 0) & (height > 0)
    square = np.abs(width - height) <= SQUARE_TOLERANCE * np.maximum(width, height)
    orientation = np.where(
        square,
        pb.ORIENTATION_SQUARE,
        np.where(width > height, pb.ORIENTATION_LANDSCAPE, pb.ORIENTATION_PORTRAIT),
    )
    return np.where(known, orientation, UNKNOWN_ORIENTATION).astype(np.int8)


def is_filtered(photo_filter: pb.PhotoFilter | None) -> bool:
    """Whether ``photo_filter`` sets any condition (an empty message restricts nothing)."""
    return photo_filter is not None and photo_filter.ByteSize() > 0


@dataclass
class PhotoAttributes:
    """What filters test, one entry per catalogue photo (``photo_idx`` order).

    Attributes
    ----------
    orientation:
        ``Orientation`` values (int8; 0 where the size is unknown).
    featured:
        Whether Unsplash featured the photo.
    submitted_ns:
        Submission time in ns since the epoch (UTC); the int64 minimum where unknown.
    downloads, views:
        ``stats_downloads`` and ``stats_views``.
    photographer:
        Index into ``photographers`` (int32).
    photographers:
        Username -> its code in ``photographer``.
    color_photos:
        Colour name -> the sorted ``photo_idx`` of the photos that have it among their dominant
        colours.
    """

    orientation: np.ndarray
    featured: np.ndarray
    submitted_ns: np.ndarray
    downloads: np.ndarray
    views: np.ndarray
    photographer: np.ndarray
    photographers: dict[str, int]
    color_photos: dict[str, np.ndarray]

    @property
    def n_photos(self) -> int:
        return len(self.orientation)

    @classmethod
    def from_tables(cls, photos: pd.DataFrame, colors: pd.DataFrame | None) -> PhotoAttributes:
        """Read the attributes off a catalogue's photos and colors tables."""
        photos = with_filter_columns(photos)
        submitted = pd.to_datetime(photos["photo_submitted_at"]).astype("datetime64[ns]")
        codes, names = pd.factorize(photos["photographer_username"].to_numpy(dtype=object))
        color_photos: dict[str, np.ndarray] = {}
        if colors is not None and len(colors):
            grouped = colors.groupby("color", sort=True)["photo_idx"]
            for name, photo_idx in grouped:
                color_photos[str(name)] = np.unique(photo_idx.to_numpy(np.int64))
        return cls(
            orientation=orientation_of(photos["photo_width"], photos["photo_height"]),
            featured=photos["photo_featured"].to_numpy(dtype=bool),
            submitted_ns=submitted.to_numpy().view(np.int64),
            downloads=photos["stats_downloads"].to_numpy(np.int64),
            views=photos["stats_views"].to_numpy(np.int64),
            photographer=codes.astype(np.int32),
            photographers={str(name): code for code, name in enumerate(names) if name},
            color_photos=color_photos,
        )

    @classmethod
    def load(cls, catalogue_dir: str | Path, manifest: dict) -> PhotoAttributes | None:
        """The attributes of a set's catalogue, None when the set was built before filters."""
        if MANIFEST_KEY not in manifest:
            return None
        catalogue_dir = Path(catalogue_dir)
        photos = pd.read_parquet(catalogue_dir / "photos.parquet")
        colors_file = catalogue_dir / "colors.parquet"
        colors = (
            pd.read_parquet(colors_file).astype(COLOR_COLUMNS) if colors_file.exists() else None
        )
        return cls.from_tables(photos, colors)

    def mask(self, photo_filter: pb.PhotoFilter, field: str = "filter") -> np.ndarray | None:
        """The photos meeting every condition of ``photo_filter`` (bool per ``photo_idx``).

        None when the filter sets no condition.

        Raises
        ------
        InvalidArgument
            Naming the field (``filter.colors``...) for an unknown value or an impossible range.
        """
        if not is_filtered(photo_filter):
            return None
        keep = np.ones(self.n_photos, dtype=bool)
        if photo_filter.orientation:
            if photo_filter.orientation not in pb.Orientation.values():
                raise InvalidArgument(
                    f"{field}.orientation", f"unknown value {photo_filter.orientation}"
                )
            keep &= self.orientation == photo_filter.orientation
        if photo_filter.colors:
            keep &= self._color_mask(photo_filter.colors, f"{field}.colors")
        if photo_filter.photographer_usernames:
            codes = self._photographer_codes(
                photo_filter.photographer_usernames, f"{field}.photographer_usernames"
            )
            keep &= np.isin(self.photographer, codes)
        if photo_filter.HasField("featured"):
            keep &= self.featured == photo_filter.featured
        after, before = self._date_range(photo_filter, field)
        if after is not None:
            keep &= self.submitted_ns >= after
        if before is not None:
            # Unknown times are the int64 minimum: excluded by a lower bound only, so test it.
            keep &= (self.submitted_ns < before) & (self.submitted_ns != _INT64.min)
        for name, values in (("min_downloads", self.downloads), ("min_views", self.views)):
            minimum = getattr(photo_filter, name)
            if minimum < 0:
                raise InvalidArgument(f"{field}.{name}", f"must not be negative, got {minimum}")
            if minimum:
                keep &= values >= minimum
        return keep

    def _color_mask(self, colors, field: str) -> np.ndarray:
        _check_count(colors, field)
        keep = np.zeros(self.n_photos, dtype=bool)
        for color in colors:
            name = normalise_keyword(color)
            photos = self.color_photos.get(name)
            if photos is None:
                known = ", ".join(sorted(self.color_photos)) or "none: the set has no colours"
                raise InvalidArgument(field, f"unknown colour {color!r} (known: {known})")
            keep[photos] = True
        return keep

    def _photographer_codes(self, usernames, field: str) -> np.ndarray:
        _check_count(usernames, field)
        codes = []
        for username in usernames:
            code = self.photographers.get(username.strip())
            if code is None:
                raise InvalidArgument(field, f"unknown photographer {username!r}")
            codes.append(code)
        return np.asarray(codes, np.int32)

    @staticmethod
    def _date_range(photo_filter: pb.PhotoFilter, field: str) -> tuple[int | None, int | None]:
        bounds = []
        for name in ("submitted_after", "submitted_before"):
            if not photo_filter.HasField(name):
                bounds.append(None)
                continue
            stamp = getattr(photo_filter, name)
            low, high = _TIMESTAMP_SECONDS
            if not low <= stamp.seconds <= high or not 0 <= stamp.nanos < 1_000_000_000:
                raise InvalidArgument(
                    f"{field}.{name}", "must be a valid timestamp (years 1 to 9999)"
                )
            ns = stamp.seconds * 1_000_000_000 + stamp.nanos
            bounds.append(min(max(ns, _INT64.min + 1), _INT64.max))
        after, before = bounds
        if after is not None and before is not None and after >= before:
            raise InvalidArgument(
                f"{field}.submitted_before",
                f"must be later than {field}.submitted_after (an empty range matches nothing)",
            )
        return after, before


def _check_count(values, field: str) -> None:
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidArgument(field, f"at most {MAX_FILTER_VALUES} values, got {len(values)}")


def filter_mask(
    attributes: PhotoAttributes | None, photo_filter: pb.PhotoFilter | None, version: str
) -> np.ndarray | None:
    """The mask of ``photo_filter`` over a set's photos (None: unfiltered).

    Raises
    ------
    FiltersUnsupported
        When the filter sets a condition and the set (``version``) has no attributes.
    InvalidArgument
        For a bad value (see :meth:`PhotoAttributes.mask`).
    """
    if not is_filtered(photo_filter):
        return None
    if attributes is None:
        raise FiltersUnsupported(
            f"artifact set {version} was built before photo filters: it serves unfiltered "
            "requests only; rebuild it with `imgsearch build` to filter"
        )
    return attributes.mask(photo_filter)
