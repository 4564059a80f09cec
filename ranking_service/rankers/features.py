"""Sparse categorical fields of the FM and DeepFM rankers, encoded into one shared id space.

Fields, in order: user, keyword, country (the query's context), then photo, photographer,
log-bucketed views, log-bucketed downloads and, optionally, the photo's tags (a weighted bag of
its most confident keywords) for the candidate. Each field's id 0 is reserved for "unknown"
(and padding); field ``f``'s ids are shifted by ``offsets[f]`` so one ``nn.Embedding`` holds all.
Optionally too, one dense photo field: the photo's CLIP image embedding reduced by PCA.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.image_embeddings import ImageEmbeddings

CONTEXT_FIELDS = ("user", "keyword", "country")
PHOTO_FIELDS = ("photo", "photographer", "views", "downloads")
TAG_FIELD = "tags"
FIELDS = CONTEXT_FIELDS + PHOTO_FIELDS + (TAG_FIELD,)
MAX_LOG_BUCKET = 40


def log_bucket(values: np.ndarray) -> np.ndarray:
    """Return ``floor(log2(1 + value))`` clipped to ``[0, MAX_LOG_BUCKET]`` (int64)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    return np.minimum(np.floor(np.log2(1.0 + values)), MAX_LOG_BUCKET).astype(np.int64)


def _vocabulary(values: pd.Series, min_count: int) -> list[str]:
    """Return the non-empty values seen at least ``min_count`` times, most frequent first."""
    counts = values[values != ""].value_counts(sort=False)
    counts = counts[counts >= min_count]
    frame = pd.DataFrame({"value": counts.index.astype(str), "n": counts.to_numpy()})
    return frame.sort_values(["n", "value"], ascending=[False, True])["value"].tolist()


class FieldEncoder:
    """Vocabularies of the seven fields and the encoding of queries, conversions and photos.

    Attributes
    ----------
    user_ids:
        Field-local id (0 = unknown) of each catalogue user index.
    keyword_names, country_names:
        Vocabularies; the name at position ``i`` has field-local id ``i + 1``.
    photo_fields:
        ``(n_photos + 1, 4)`` global ids of the photo fields; row 0 is the unknown photo and
        row ``p + 1`` is photo ``p``.
    photo_tag_ids, photo_tag_weights:
        ``(n_photos + 1, T)`` global ids of each photo's tags and their keyword confidences
        (padding has weight 0); ``T = 0`` when the tag field is off.
    field_sizes:
        Ids per field (unknown included), in :data:`FIELDS` order (the tag field last, when on).
    photo_dense:
        ``(n_photos + 1, D)`` float32 dense photo features (the reduced CLIP embedding; row 0
        and photos without an image are zeros); ``D = 0`` when the dense field is off.
    """

    def __init__(
        self,
        user_ids: np.ndarray,
        keyword_names: list[str],
        country_names: list[str],
        photo_fields: np.ndarray,
        field_sizes: list[int],
        photo_tag_ids: np.ndarray | None = None,
        photo_tag_weights: np.ndarray | None = None,
        photo_dense: np.ndarray | None = None,
    ) -> None:
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        self.keyword_names = list(keyword_names)
        self.country_names = list(country_names)
        self.photo_fields = np.asarray(photo_fields, dtype=np.int64)
        n_rows = len(self.photo_fields)
        if photo_tag_ids is None:
            photo_tag_ids = np.zeros((n_rows, 0), dtype=np.int64)
            photo_tag_weights = np.zeros((n_rows, 0), dtype=np.float32)
        self.photo_tag_ids = np.asarray(photo_tag_ids, dtype=np.int64)
        self.photo_tag_weights = np.asarray(photo_tag_weights, dtype=np.float32)
        if photo_dense is None:
            photo_dense = np.zeros((n_rows, 0), dtype=np.float32)
        self.photo_dense = np.ascontiguousarray(photo_dense, dtype=np.float32)
        self.field_sizes = [int(size) for size in field_sizes]
        self.offsets = np.r_[0, np.cumsum(self.field_sizes)[:-1]].astype(np.int64)
        self._keyword_ids = {name: i + 1 for i, name in enumerate(self.keyword_names)}
        self._country_ids = {name: i + 1 for i, name in enumerate(self.country_names)}

    @property
    def n_features(self) -> int:
        """Total ids over all fields (the embedding table's rows)."""
        return int(sum(self.field_sizes))

    @property
    def n_fields(self) -> int:
        """Fields in use: seven, or eight with the tag field."""
        return len(self.field_sizes)

    @property
    def has_tags(self) -> bool:
        """Whether the tag field is on."""
        return self.photo_tag_ids.shape[1] > 0

    @property
    def dense_dims(self) -> int:
        """Dimensions of the dense photo field (0 when off)."""
        return int(self.photo_dense.shape[1])

    @property
    def n_photos(self) -> int:
        """Photos of the catalogue the encoder was built on."""
        return len(self.photo_fields) - 1

    @classmethod
    def fit(
        cls,
        catalogue: Catalogue,
        min_user_conversions: int = 1,
        min_keyword_conversions: int = 1,
        photo_tags: int = 10,
        embeddings: ImageEmbeddings | None = None,
        dense_dims: int = 16,
    ) -> FieldEncoder:
        """Build the vocabularies from the catalogue and its (training) conversions.

        Parameters
        ----------
        catalogue:
            Photos give the photo fields; ``conversions`` give users, keywords and countries;
            ``keywords`` give the tags.
        min_user_conversions, min_keyword_conversions:
            Rarer users / keywords map to the unknown id.
        photo_tags:
            Tags per photo in the tag field (its most confident keywords); 0 turns it off.
        embeddings:
            The catalogue's image embeddings, for the dense field; None turns it off.
        dense_dims:
            PCA dimensions of the dense field; 0 turns it off.
        """
        conversions = catalogue.conversions
        user_counts = np.bincount(
            conversions["user_idx"].to_numpy(dtype=np.int64), minlength=catalogue.n_users
        )[: catalogue.n_users]
        known = user_counts >= max(min_user_conversions, 1)
        user_ids = np.zeros(catalogue.n_users, dtype=np.int64)
        user_ids[known] = np.arange(1, int(known.sum()) + 1)
        keyword_names = _vocabulary(conversions["keyword"].astype(str), min_keyword_conversions)
        country_names = _vocabulary(conversions["conversion_country"].astype(str), 1)

        photos = catalogue.photos
        usernames = photos["photographer_username"].fillna("").astype(str)
        photographer_codes, photographers = pd.factorize(usernames.where(usernames != ""))
        local = np.stack(
            [
                np.arange(1, catalogue.n_photos + 1),
                photographer_codes + 1,  # factorize gives -1 for missing: unknown id 0
                log_bucket(photos["stats_views"].to_numpy()) + 1,
                log_bucket(photos["stats_downloads"].to_numpy()) + 1,
            ],
            axis=1,
        ).astype(np.int64)
        field_sizes = [
            int(known.sum()) + 1,
            len(keyword_names) + 1,
            len(country_names) + 1,
            catalogue.n_photos + 1,
            len(photographers) + 1,
            MAX_LOG_BUCKET + 2,
            MAX_LOG_BUCKET + 2,
        ]
        tag_local, tag_weights, n_tags = _photo_tags(catalogue, photo_tags)
        if photo_tags > 0:
            field_sizes.append(n_tags + 1)
        offsets = np.r_[0, np.cumsum(field_sizes)[:-1]]
        photo_fields = np.zeros((catalogue.n_photos + 1, len(PHOTO_FIELDS)), dtype=np.int64)
        photo_fields[1:] = local
        photo_fields += offsets[len(CONTEXT_FIELDS) : len(CONTEXT_FIELDS) + len(PHOTO_FIELDS)]
        tag_ids = tag_local + (offsets[-1] if photo_tags > 0 else 0)
        dense = None
        if embeddings is not None and dense_dims > 0 and embeddings.dim > 0:
            dense = np.zeros((catalogue.n_photos + 1, min(dense_dims, embeddings.dim)), np.float32)
            matrix, has = embeddings.dense(catalogue.n_photos)
            dense[1:][has] = principal_components(matrix[has], dense.shape[1])
        return cls(
            user_ids,
            keyword_names,
            country_names,
            photo_fields,
            field_sizes,
            tag_ids,
            tag_weights,
            dense,
        )

    def user_id(self, user_idx: int | None) -> int:
        """Return the field-local id of a catalogue user index (0 when unknown)."""
        if user_idx is None or not 0 <= user_idx < len(self.user_ids):
            return 0
        return int(self.user_ids[user_idx])

    def keyword_id(self, keyword: str) -> int:
        """Return the field-local id of a keyword (0 when unknown)."""
        return self._keyword_ids.get(normalise_keyword(keyword), 0)

    def encode_context(
        self, user_idx: int | None, keyword: str, country: str
    ) -> tuple[np.ndarray, list[str]]:
        """Return the query's global context ids ``(3,)`` and the names of unknown fields.

        An empty country is simply absent (not reported); an unknown user or keyword is.
        """
        local = np.array(
            [self.user_id(user_idx), self.keyword_id(keyword), self._country_ids.get(country, 0)],
            dtype=np.int64,
        )
        unknown = [name for name, i in zip(CONTEXT_FIELDS[:2], local[:2]) if i == 0]
        return local + self.offsets[: len(CONTEXT_FIELDS)], unknown

    def encode_conversions(self, conversions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Encode conversions in bulk: ``(context ids (n, 3), photo rows (n,))``.

        Photo rows index :attr:`photo_fields` (photo index + 1; 0 when out of range).
        """
        users = conversions["user_idx"].to_numpy(dtype=np.int64)
        in_range = (users >= 0) & (users < len(self.user_ids))
        user_local = np.where(in_range, self.user_ids[np.where(in_range, users, 0)], 0)
        keyword_local = _map_names(conversions["keyword"], self._keyword_ids)
        country_local = _map_names(conversions["conversion_country"], self._country_ids)
        context = np.stack([user_local, keyword_local, country_local], axis=1)
        context += self.offsets[: len(CONTEXT_FIELDS)]
        return context, self.photo_rows(conversions["photo_idx"].to_numpy(dtype=np.int64))

    def photo_rows(self, photo_idx: np.ndarray) -> np.ndarray:
        """Return rows of :attr:`photo_fields` for photo indexes (0 for out-of-range ones)."""
        photo_idx = np.asarray(photo_idx, dtype=np.int64)
        return np.where((photo_idx >= 0) & (photo_idx < self.n_photos), photo_idx + 1, 0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the numeric parts for an ``.npz``."""
        return {
            "user_ids": self.user_ids,
            "photo_fields": self.photo_fields,
            "photo_tag_ids": self.photo_tag_ids,
            "photo_tag_weights": self.photo_tag_weights,
            "photo_dense": self.photo_dense,
        }

    def to_config(self) -> dict:
        """Return the JSON parts (vocabularies and field sizes)."""
        return {
            "keyword_names": self.keyword_names,
            "country_names": self.country_names,
            "field_sizes": self.field_sizes,
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, np.ndarray], config: dict) -> FieldEncoder:
        """Rebuild an encoder from :meth:`to_arrays` and :meth:`to_config` output."""
        return cls(
            arrays["user_ids"],
            config["keyword_names"],
            config["country_names"],
            arrays["photo_fields"],
            config["field_sizes"],
            arrays["photo_tag_ids"],
            arrays["photo_tag_weights"],
            arrays.get("photo_dense"),
        )


def _photo_tags(catalogue: Catalogue, per_photo: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each photo's ``per_photo`` most confident keywords as field-local ids and weights.

    Returns ``(ids (n_photos + 1, per_photo), weights, vocabulary size)``; row 0 and padding
    are id 0 with weight 0. Tags are numbered by first appearance in (photo, confidence) order.
    """
    n_rows = catalogue.n_photos + 1
    ids = np.zeros((n_rows, max(per_photo, 0)), dtype=np.int64)
    weights = np.zeros((n_rows, max(per_photo, 0)), dtype=np.float32)
    keywords = catalogue.keywords
    if per_photo <= 0 or len(keywords) == 0:
        return ids, weights, 0
    photo = keywords["photo_idx"].to_numpy(dtype=np.int64)
    confidence = keywords["confidence"].to_numpy(dtype=np.float32)
    keep = (photo >= 0) & (photo < catalogue.n_photos)
    order = np.flatnonzero(keep)[np.lexsort((-confidence[keep], photo[keep]))]
    photo, confidence = photo[order], confidence[order]
    start = np.flatnonzero(np.r_[True, np.diff(photo) != 0])
    rank = np.arange(len(photo)) - np.repeat(start, np.diff(np.r_[start, len(photo)]))
    top = rank < per_photo
    codes, names = pd.factorize(keywords["keyword"].to_numpy()[order][top])
    ids[photo[top] + 1, rank[top]] = codes + 1
    weights[photo[top] + 1, rank[top]] = np.maximum(confidence[top], 1e-3)
    return ids, weights, len(names)


def _map_names(values: pd.Series, ids: dict[str, int]) -> np.ndarray:
    """Map a column of names to field-local ids (0 for names not in ``ids``), vectorised."""
    codes, uniques = pd.factorize(values.astype(str))
    lookup = np.array([ids.get(name, 0) for name in uniques], dtype=np.int64)
    return lookup[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def principal_components(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Project rows on their ``dims`` leading principal components, scaled to unit variance.

    Unit variance per component keeps the dense field on the scale of the other fields'
    initial embeddings, whatever the CLIP model's embedding scale.
    """
    if len(vectors) == 0:
        return np.zeros((0, dims), dtype=np.float32)
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:dims].T
    spread = projected.std(axis=0)
    projected /= np.where(spread > 0, spread, 1.0)
    out = np.zeros((len(vectors), dims), dtype=np.float32)
    out[:, : projected.shape[1]] = projected
    return out
