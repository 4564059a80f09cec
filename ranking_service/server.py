"""The RankingService gRPC server: per-request choice of ranker over one artifact set."""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch import artifacts
from imgsearch.admission import current_deadline, run_live
from imgsearch.catalogue import Catalogue, normalise_keyword
from imgsearch.config import MAX_CANDIDATES_K, MAX_K, MAX_RECENT_PHOTOS, RankingConfig
from imgsearch.conversion_store import open_store
from imgsearch.conversion_store.background import BackgroundStore
from imgsearch.names import ranker_name, ranker_value
from imgsearch.ranking.v1 import ranking_service_pb2 as pb
from imgsearch.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from imgsearch.serving import (
    LATENCY,
    InvalidArgument,
    Reloadable,
    Service,
    start_service,
)
from ranking_service.history import LoggedHistory
from ranking_service.live_photos import HIGH_WATER_KEY, LivePhotos, LivePhotosTailer
from ranking_service.rankers.base import Ranker, RankQuery
from ranking_service.rankers.common import all_known

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RankingService"].full_name
NAME = "ranking"
# Rankers whose scoring runs torch: run them off the event loop.
OFFLOADED = {"fm", "deepfm"}
# The default of a set that records no validation choice: the baseline that needs no model.
FALLBACK_DEFAULT = "popularity"
MAX_RECOMMEND = 10_000
# Rankers that personalize from a user's history (ALS folds it in; EASE and item-kNN sum their
# photos' neighbours; clip_profile averages their images; FM and DeepFM take the country;
# stacked passes it to its bases): for users the model has not seen, they get the user's
# logged conversions.
USES_HISTORY = {"als", "fm", "deepfm", "ease", "item_knn", "clip_profile", "stacked"}
# At start ranking waits this long for the conversion store, then serves without it for now.
STORE_OPEN_TIMEOUT_S = 2.0
# A read stuck in the store gives its thread back after this (requests stop waiting sooner).
STORE_CALL_TIMEOUT_S = 1.0
logger = logging.getLogger("imgsearch.ranking")
# The recent photos of a request that names none (read-only: shared by every such request).
NO_PHOTOS = np.zeros(0, dtype=np.int64)
NO_PHOTOS.setflags(write=False)


class RetrievalScores:
    """A request's ``retrieval_scores`` as float32, converted only when a ranker reads them.

    ALS and the other personal rankers never do for a user they know, so their calls skip
    making a hundred Python floats into an array; ``np.asarray`` (and any numpy function)
    converts it.
    """

    __slots__ = ("_values",)

    def __init__(self, values):
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        scores = np.asarray(self._values, dtype=np.float32)
        return scores if dtype is None else scores.astype(dtype, copy=False)


@dataclass
class RankingState:
    """Everything one artifact set gives ranking; swapped whole on reload."""

    version: str
    path: Path
    catalogue: Catalogue
    rankers: dict[str, Ranker]
    default_ranker: str
    user_country: dict[int, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    default_reason: str = ""
    # (kind, name, reason) of each default, for AdminService.GetStatus.
    defaults: list[tuple[str, str, str]] = field(default_factory=list)
    # Rankers the set holds but this server could not load, and why.
    unloaded: dict[str, str] = field(default_factory=dict)
    # The live catalogue: the set's high-water mark, and the log's photos beyond the set
    # (None: served without the log, or not read yet).
    catalog_log_seq: int = 0
    live: LivePhotos | None = None


def load_ranking_state(artifacts_path: str, default_ranker: str = "") -> RankingState:
    """Load every ranker the artifact set holds, and the default the set records.

    The default is, in order: ``default_ranker`` (a setting), the ranker the set's validation
    chose (``default_ranker`` in its manifest), or popularity for a set that records no choice;
    ``RankingState.default_reason`` says which and why.
    """
    from imgsearch.image_embeddings import ImageEmbeddings
    from ranking_service.rankers import create_ranker, load_ranker, ranker_class
    from ranking_service.rankers.common import OutdatedRankerError

    artifact_set = artifacts.resolve(artifacts_path)
    catalogue = Catalogue.load(artifact_set.file(artifacts.CATALOGUE_DIR))
    embeddings = None
    # Read only for a ranker that scores with image embeddings or may (at a million photos
    # they are 512 MB of the server's memory).
    wanted = (ranker_class(name) for name in artifact_set.rankers)
    if artifact_set.has(artifacts.EMBEDDINGS) and any(
        cls.uses_embeddings or cls.accepts_embeddings for cls in wanted
    ):
        embeddings = ImageEmbeddings.load(artifact_set.file(artifacts.EMBEDDINGS))
    rankers: dict[str, Ranker] = {}
    unloaded: dict[str, str] = {}
    for name in artifact_set.rankers:
        if ranker_class(name).uses_embeddings and embeddings is None:
            unloaded[name] = f"the set has no {artifacts.EMBEDDINGS}"
            logger.warning("ranker %s not loaded: %s", name, unloaded[name])
            continue
        try:
            rankers[name] = load_ranker(
                name, artifact_set.file(artifacts.RANKERS_DIR) / name, catalogue, embeddings
            )
        except OutdatedRankerError as error:
            # One stale ranker should not keep the set's others from serving.
            unloaded[name] = str(error)
            logger.warning("ranker %s not loaded: %s", name, unloaded[name])
    for name in ("none", "popularity"):
        if name not in rankers:
            # The baselines need no training artifacts beyond the catalogue itself.
            rankers[name] = create_ranker(name).fit(catalogue, show_progress=False)
    if default_ranker and default_ranker not in rankers:
        raise ValueError(
            f"default ranker {default_ranker!r} is not in the artifact set "
            f"(available: {', '.join(rankers)})"
        )
    default, reason = choose_default(artifact_set, rankers, default_ranker, unloaded)
    conversions = catalogue.conversions
    user_country: dict[int, str] = {}
    if len(conversions):
        # Most recent country per user: a side feature for FM/DeepFM at request time.
        last = conversions.drop_duplicates("user_idx", keep="last")
        user_country = dict(zip(last["user_idx"].tolist(), last["conversion_country"].tolist()))
    return RankingState(
        version=artifact_set.version,
        path=artifact_set.path,
        catalogue=catalogue,
        rankers=rankers,
        default_ranker=default,
        user_country=user_country,
        models=list(rankers),
        default_reason=reason,
        defaults=[("ranker", default, reason)],
        unloaded=unloaded,
        catalog_log_seq=int(artifact_set.manifest.get(HIGH_WATER_KEY, 0)),
    )


def choose_default(
    artifact_set: artifacts.ArtifactSet,
    rankers: dict[str, Ranker],
    setting: str = "",
    unloaded: dict[str, str] | None = None,
) -> tuple[str, str]:
    """The default ranker of a set and why: the setting, the set's validation choice, or popularity.

    Returns
    -------
    tuple of str
        ``(name, reason)``.
    """
    if setting:
        return setting, "set by the server's default-ranker setting (IMGSEARCH_DEFAULT_RANKER)"
    recorded = artifact_set.manifest.get("default_ranker", "")
    if recorded in rankers:
        reason = artifact_set.manifest.get("default_ranker_reason", "")
        return recorded, reason or "recorded by the set's build"
    if recorded:
        why = (unloaded or {}).get(recorded, "it is not in the set")
        return FALLBACK_DEFAULT, (
            f"the set's validation chose {recorded}, which is not loaded ({why}); "
            f"serving {FALLBACK_DEFAULT}"
        )
    return FALLBACK_DEFAULT, (
        f"artifact set {artifact_set.version} records no validation choice (built before "
        f"default selection); serving {FALLBACK_DEFAULT}, the baseline"
    )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k best scores, ties kept in retrieval (input) order."""
    # A stable sort keeps equal scores in input order (a lexsort on the positions, cheaper).
    return (-scores).argsort(kind="stable")[:k]


def recommend(
    state: RankingState, ranker, user_idx: int | None, k: int, recent: np.ndarray, note: str = ""
) -> pb.RecommendResponse:
    """The ``k`` photos of the whole catalogue ``ranker`` scores best for a user (``note``:
    what the user's history lookup had to say, added to the fallback reason)."""
    ranked = ranker.recommend(user_idx, k, recent)
    scores = np.asarray(ranked.scores, dtype=np.float64)
    order = top_k(scores, k)
    ids = state.catalogue.photo_ids(order)
    return pb.RecommendResponse(
        results=[
            pb.RankedPhoto(photo_id=pid, score=float(scores[i]))
            for pid, i in zip(ids, order.tolist())
        ],
        fallback_reason="; ".join(r for r in (ranked.fallback_reason, note) if r),
        artifact_version=state.version,
    )


class RankingServicer(pb_grpc.RankingServiceServicer):
    """Serves ``Rank`` and ``Recommend`` from the state held by ``holder``.

    A user the model has not seen is personalized from the photos the request names
    (``recent_photo_ids``) and from their latest conversions logged since the model was
    trained (``history``), as far as the store answers within its deadline.
    """

    def __init__(self, holder: Reloadable[RankingState], history: LoggedHistory | None = None):
        self.holder = holder
        self.history = history or LoggedHistory(None, 0, 0.0)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rank")
        self.stage_latency = LATENCY.labels(NAME, "rank")

    @staticmethod
    def _ranker(state: RankingState, value: int) -> str:
        if value == pb.RANKER_UNSPECIFIED:
            return state.default_ranker
        if value == pb.RANKER_TWO_STEP:
            raise InvalidArgument(
                "ranker", "RANKER_TWO_STEP is composed by the gateway; call SearchService.Search"
            )
        name = ranker_name(value)
        if name is None:
            raise InvalidArgument("ranker", f"unknown value {value}")
        if name in state.unloaded:
            raise InvalidArgument(
                "ranker",
                f"{name!r} is in artifact set {state.version} but not loaded: "
                f"{state.unloaded[name]}",
            )
        if name not in state.rankers:
            raise InvalidArgument(
                "ranker",
                f"{name!r} is not trained in artifact set {state.version} "
                f"(available: {', '.join(state.rankers)})",
            )
        return name

    @staticmethod
    def _recent(state: RankingState, photo_ids) -> np.ndarray:
        if not photo_ids:
            return NO_PHOTOS
        if len(photo_ids) > MAX_RECENT_PHOTOS:
            raise InvalidArgument(
                "recent_photo_ids", f"at most {MAX_RECENT_PHOTOS} ids, got {len(photo_ids)}"
            )
        idx = [state.catalogue.photo_idx(pid) for pid in photo_ids]
        return np.asarray([i for i in idx if i is not None], dtype=np.int64)

    @staticmethod
    def _packed_indices(state: RankingState, request, n_candidates: int) -> np.ndarray | None:
        """The candidates' catalogue indexes the request carries, when they are of this set
        and all in its catalogue; None: look the ids up (ids not of the set, a live photo).

        One C call instead of a hundred ids made into strings and looked up in a dict.
        """
        packed = request.packed_candidate_indices
        if not packed:
            return None
        if len(packed) != 4 * n_candidates:
            raise InvalidArgument(
                "packed_candidate_indices",
                f"must hold 4 bytes per candidate ({4 * n_candidates}), got {len(packed)}",
            )
        if request.candidate_indices_version != state.version:
            return None  # another set's numbering (a reload in between): the ids decide
        indices = np.frombuffer(packed, dtype="<i4").astype(np.int64)
        if not all_known(indices, state.catalogue.n_photos):
            return None
        return indices

    async def _history(
        self, state: RankingState, user_id: str, user_idx: int | None, recent: np.ndarray
    ) -> tuple[np.ndarray, str, str]:
        """``recent`` plus the logged photos of a user the model has not seen; their country;
        and a note when the store could not answer in time."""
        if user_idx is not None or not user_id:
            return recent, "", ""
        logged, country, note = await self.history.read(state.catalogue, user_id)
        if len(logged):
            recent = np.concatenate([recent, logged])
        return recent, country, note

    async def close(self) -> None:
        await self.history.close()

    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        state = self.holder.state  # one snapshot per request: never mixes two versions
        name = self._ranker(state, request.ranker)
        if not 1 <= request.k <= MAX_K:
            raise InvalidArgument("k", f"must be between 1 and {MAX_K}, got {request.k}")
        photo_ids = request.candidate_photo_ids  # no copy: only the k results' ids are read
        n_candidates = len(photo_ids)
        if n_candidates > MAX_CANDIDATES_K:
            raise InvalidArgument(
                "candidate_photo_ids",
                f"at most {MAX_CANDIDATES_K} candidates, got {n_candidates}",
            )
        if request.retrieval_scores and len(request.retrieval_scores) != n_candidates:
            raise InvalidArgument(
                "retrieval_scores",
                f"must be empty or one per candidate ({n_candidates}), "
                f"got {len(request.retrieval_scores)}",
            )
        start = time.perf_counter()
        catalogue = state.catalogue
        candidate_idx = self._packed_indices(state, request, n_candidates)
        if candidate_idx is None:
            candidate_idx = catalogue.photo_idx_list(photo_ids)
            some_unknown = None in candidate_idx
        else:
            some_unknown = False
        live = None
        if state.live is not None and some_unknown:
            # Photos written through the live catalogue since the set was built: numbered
            # past the set's photos and scored cold (ranking_service.live_photos).
            live = state.live.candidates(photo_ids, candidate_idx)
        if request.retrieval_scores:
            retrieval_scores = RetrievalScores(request.retrieval_scores)
        else:
            # No scores given: retrieval order itself, best first.
            retrieval_scores = -np.arange(n_candidates, dtype=np.float32)
        # Positions of the candidates the catalogue knows; None when it knows them all (the
        # usual case, which then needs no index arrays or copies).
        known_pos = None
        if some_unknown:
            known = [i for i, idx in enumerate(candidate_idx) if idx is not None]
            candidate_idx = [candidate_idx[i] for i in known]
            known_pos = np.asarray(known, dtype=np.int64)
            retrieval_scores = np.asarray(retrieval_scores)[known_pos]
            live = None if live is None else live.take(known_pos)
        user_idx = catalogue.user_idx(request.user_id) if request.user_id else None
        recent = self._recent(state, request.recent_photo_ids)
        country = state.user_country.get(user_idx, "") if user_idx is not None else ""
        note = ""
        if name in USES_HISTORY and user_idx is None and request.user_id:
            # Only a user the model has not seen reads the logged history.
            recent, logged_country, note = await self._history(
                state, request.user_id, user_idx, recent
            )
            country = country or logged_country
        query = RankQuery(
            user_idx=user_idx,
            keyword=normalise_keyword(request.keyword or request.query),
            candidates=np.asarray(candidate_idx, dtype=np.int64),
            retrieval_scores=retrieval_scores,
            recent_photos=recent,
            country=country,
            live=live,
        )
        ranker = state.rankers[name]
        default_reason = ""
        if request.ranker == pb.RANKER_UNSPECIFIED:
            default_reason = f"default ranker {name}: {state.default_reason}"
        if len(query.candidates) == 0:
            scores, reason = np.zeros(0, np.float32), ""
        elif name in OFFLOADED:
            ranked = await run_live(
                self.executor, ranker.score, query, deadline=current_deadline(), service=NAME
            )
            scores, reason = ranked.scores, ranked.fallback_reason
        else:
            ranked = ranker.score(query)
            scores, reason = ranked.scores, ranked.fallback_reason
        # Photos the catalogue does not know go last, in retrieval order.
        if known_pos is None:
            # float32 scores (every ranker's) as they are: float64 would order them and
            # answer them the same, after a copy.
            all_scores = scores if scores.dtype == np.float32 else np.asarray(scores, np.float64)
        else:
            all_scores = np.full(n_candidates, -np.inf, dtype=np.float64)
            all_scores[known_pos] = scores
        missing = n_candidates - len(candidate_idx)
        unknown = f"{missing} unknown photo id(s) ranked last" if missing else ""
        if unknown or note:
            reason = "; ".join(r for r in (reason, unknown, note) if r)
        order = top_k(all_scores, request.k)
        top = all_scores[order].tolist()
        if not all(map(math.isfinite, top)):
            # Unknown photos (-inf) answer one below the lowest score of a known one.
            finite_min = float(np.min(scores)) if len(scores) else 0.0
            top = [score if math.isfinite(score) else finite_min - 1.0 for score in top]
        response = pb.RankResponse(
            ranker=ranker_value(name),
            fallback_reason=reason,
            artifact_version=state.version,
            default_reason=default_reason,
        )
        add = response.results.add
        for i, score in zip(order.tolist(), top):
            add(photo_id=photo_ids[i], score=score)
        elapsed = time.perf_counter() - start
        self.stage_latency.observe(elapsed)
        response.ranking_ms = elapsed * 1000
        return response

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        state = self.holder.state
        if not 1 <= request.k <= MAX_RECOMMEND:
            raise InvalidArgument("k", f"must be between 1 and {MAX_RECOMMEND}, got {request.k}")
        ranker = state.rankers.get("als")
        if ranker is None:
            raise InvalidArgument(
                "ranker", f"Recommend needs an ALS model; artifact set {state.version} has none"
            )
        user_idx = state.catalogue.user_idx(request.user_id) if request.user_id else None
        recent = self._recent(state, request.recent_photo_ids)
        recent, _, note = await self._history(state, request.user_id, user_idx, recent)
        # Scoring and sorting the whole catalogue takes milliseconds per 100k photos: off the
        # event loop, so other RPCs keep being served meanwhile.
        return await run_live(
            self.executor,
            recommend,
            state,
            ranker,
            user_idx,
            request.k,
            recent,
            note,
            deadline=current_deadline(),
            service=NAME,
        )


async def create_ranking_server(config: RankingConfig) -> Service:
    """Create, load and start a ranking server; returns it once it is SERVING."""

    store = None
    if config.foldin_conversions > 0:
        location = config.conversion_store()
        # Its own connection and thread: reads never wait behind another request's work.
        store = BackgroundStore(
            lambda: open_store(**location, timeout_s=STORE_CALL_TIMEOUT_S),
            name="conversions-reader",
        )
        problem = await store.try_open(STORE_OPEN_TIMEOUT_S)
        if problem:
            logger.warning("conversion store not open yet", extra={"problem": problem})
    history = LoggedHistory(store, config.foldin_conversions, config.foldin_timeout_ms / 1000)

    def add(server, holder):
        servicer = RankingServicer(holder, history)
        pb_grpc.add_RankingServiceServicer_to_server(servicer, server)
        if not config.live_catalogue:
            return servicer
        # The live catalogue's photos beyond the set, read on a connection of their own.
        location = config.conversion_store()
        log_store = BackgroundStore(
            lambda: open_store(**location, timeout_s=STORE_CALL_TIMEOUT_S), name="catalog-log"
        )
        tailer = LivePhotosTailer(holder, log_store, config.catalog_poll_ms / 1000)
        tailer.start()
        return [servicer, tailer]

    return await start_service(
        NAME,
        config,
        [SERVICE_NAME],
        lambda path: load_ranking_state(path, config.default_ranker),
        add,
    )
