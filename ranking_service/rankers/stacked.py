"""The ``stacked`` ranker: LightGBM lambdarank over cheap base rankers and retrieval features.

Base rankers (popularity, ALS and, when the set has CLIP, clip_profile: the cheap ones, so a
request stays within a couple of milliseconds) score the candidates; a gradient-boosted
ranking model (LightGBM's ``lambdarank`` objective, which optimises NDCG directly) combines
their scores and ranks within the request with what retrieval and the photos say
(:mod:`ranking_service.rankers.stack_features`). The stacker must learn from queries the bases
did not train on: the bases are fitted on the conversions before a held-out slice, the stacker
on that slice's (user, keyword) queries, then the bases are refitted on all conversions for
serving. Its hyper-parameters (:data:`STACKER_PARAMS`, :data:`ROUNDS`) are fixed, not tuned.

Saved without pickle: LightGBM's own text model format, ``.npz`` feature tables, and each base
ranker saved as itself under ``bases/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.booster_predict import predict_rows, prepare
from ranking_service.rankers.common import (
    as_candidates,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    save_arrays,
    write_config,
)
from ranking_service.rankers.popularity import PopularityRanker
from ranking_service.rankers.stack_features import StackFeatures, feature_names

# Cheap bases: each scores 100 candidates in about 0.1–0.2 ms (README "Performance").
BASES = ("popularity", "als", "clip_profile")
# Fixed before any test figure was looked at: small trees, few rounds, strong leaves (the
# slice holds a few thousand queries), one thread at serving.
STACKER_PARAMS = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "num_leaves": 15,
    "learning_rate": 0.1,
    "min_data_in_leaf": 50,
    "max_bin": 63,
    "feature_fraction": 0.8,
    "lambda_l2": 1.0,
    "deterministic": True,
    "force_row_wise": True,
    # One thread: the fits are small, and OpenMP threads that wait on a busy machine cost
    # far more than they save (the same trees: the fit is deterministic).
    "num_threads": 1,
    "verbose": -1,
    "seed": 0,
}
ROUNDS = 60
# Queries the stacker learns from (a seeded draw) and negatives kept per query (all positives
# are kept): lambdarank learns from pairs, so a sample of the negatives keeps the order it
# learns and bounds the build's time. The cap is the validation slice's own (6,000 queries
# drawn): the stacker learns from every slice query with a converted candidate.
MAX_STACK_QUERIES = 6000
NEGATIVES_PER_QUERY = 40
# Share of the most recent conversions the standalone fit holds out for the stacker.
HOLDOUT_FRACTION = 0.2
MODEL_FILE = "model.txt"
FEATURES_FILE = "features.npz"
BASES_DIR = "bases"


class StackedRanker(Ranker):
    """LightGBM lambdarank over base rankers' scores and per-candidate features.

    Parameters
    ----------
    bases:
        Base ranker names; popularity is always one (it gives the query's prior).
    base_params:
        Constructor parameters per base (defaults when missing).
    rounds:
        Boosting rounds.
    seed:
        Seed of the query draw and the negatives' sample.
    serves:
        A base whose order the ranker serves instead of its trees' (the build's rule when the
        trees did not beat their best base on validation: ``ranking_service.stacking``);
        None serves the trees.
    """

    name = "stacked"
    # Loads the set's image embeddings when it has them (clip_profile base, CLIP similarity).
    accepts_embeddings = True

    def __init__(
        self,
        bases: tuple[str, ...] | list[str] = BASES,
        base_params: dict | None = None,
        rounds: int = ROUNDS,
        seed: int = 0,
        serves: str | None = None,
    ) -> None:
        self.bases = tuple(dict.fromkeys(["popularity", *bases]))
        if serves is not None and serves not in self.bases:
            raise ValueError(f"serves must be one of the bases {self.bases}, got {serves!r}")
        self.serves = serves
        self.base_params = {k: dict(v) for k, v in (base_params or {}).items()}
        self.rounds = int(rounds)
        self.seed = int(seed)
        self.base_models: dict[str, Ranker] = {}
        self.features: StackFeatures | None = None
        self.boosters: list = []
        # Out-of-fold scoring (validation only): the booster of each user's fold.
        self.fold_of_user: np.ndarray | None = None
        self.fit_figures: dict = {}

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {
            "bases": list(self.bases),
            "base_params": self.base_params,
            "rounds": self.rounds,
            "seed": self.seed,
            "serves": self.serves,
        }

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
    ) -> StackedRanker:
        """Fit bases on the earlier conversions, the stacker on the later, then refit bases.

        Raises
        ------
        ValueError
            Without ``candidates`` (the stacker learns on the served retriever's candidates).
        """
        from ranking_service.rankers.validation import ValidationSet

        if candidates is None:
            raise ValueError("the stacked ranker needs the served retriever's candidate lists")
        self._drop_unavailable(embeddings)
        split = temporal_split(catalogue.conversions, HOLDOUT_FRACTION)
        earlier = catalogue.with_conversions(split.earlier)
        held_out = self.fit_bases(earlier, candidates, embeddings)
        queries = ValidationSet.build(
            earlier, split.later, candidates, max_queries=MAX_STACK_QUERIES, seed=self.seed
        )
        features = StackFeatures.fit(earlier, embeddings)
        rows = stack_rows(queries.queries, queries.relevant, held_out, features, self.seed)
        self.boosters = [self.train_booster(rows)]
        self.base_models = self.fit_bases(catalogue, candidates, embeddings)
        share_popularity(self.base_models)
        self.features = StackFeatures.fit(catalogue, embeddings)
        return self

    def _drop_unavailable(self, embeddings: ImageEmbeddings | None) -> None:
        """Without embeddings, leave out the bases that need them."""
        from ranking_service.rankers import ranker_class

        if embeddings is None:
            self.bases = tuple(b for b in self.bases if not ranker_class(b).uses_embeddings)

    def fit_bases(
        self,
        catalogue: Catalogue,
        candidates: CandidateLists | None,
        embeddings: ImageEmbeddings | None,
    ) -> dict[str, Ranker]:
        """Each base fitted on ``catalogue`` with its parameters."""
        from ranking_service.rankers import create_ranker

        return {
            name: create_ranker(name, **self.base_params.get(name, {})).fit(
                catalogue, show_progress=False, candidates=candidates, embeddings=embeddings
            )
            for name in self.bases
        }

    def train_booster(self, rows: tuple[np.ndarray, np.ndarray, list[int]]):
        """A LightGBM booster fitted on ``(features, labels, group sizes)``."""
        import lightgbm

        features, labels, groups = rows
        self.fit_figures = {"queries": len(groups), "rows": int(len(labels))}
        if not groups or labels.sum() == 0:
            raise ValueError("the stacker has no held-out query with a converted candidate")
        data = lightgbm.Dataset(
            features,
            labels,
            group=groups,
            feature_name=feature_names(self.bases),
            free_raw_data=True,
        )
        return lightgbm.train(STACKER_PARAMS, data, num_boost_round=self.rounds)

    # ------------------------------------------------------------------ scoring

    def score(self, query: RankQuery, known: dict[str, RankScores] | None = None) -> RankScores:
        """Base scores, features, then the booster of the query (one thread); or the order of
        the base it :attr:`serves`.

        ``known`` holds bases' results for this very query when the caller scored them already
        (the configuration choice scores every ranker on the same requests).
        """
        if self.serves is not None:
            known = known or {}
            return known.get(self.serves) or self.base_models[self.serves].score(query)
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, len(self.features.log_views))
        # A live photo beyond the built catalogue: its features from its bases' cold scores
        # and its record (StackFeatures.rows).
        valid |= query.cold(valid)
        if len(candidates) == 0:
            return RankScores(np.zeros(0, dtype=np.float32))
        query = RankQuery(
            query.user_idx,
            query.keyword,
            candidates,
            query.retrieval_scores,
            query.recent_photos,
            query.country,
            query.live,
        )
        rows, reason = base_rows(self.base_models, self.features, query, known)
        booster = self.boosters[0]
        if self.fold_of_user is not None:
            user = query.user_idx
            if user is not None and 0 <= user < len(self.fold_of_user):
                booster = self.boosters[int(self.fold_of_user[user])]
        scores = predict_rows(booster, rows)
        return RankScores(finalize_scores(scores, valid), fallback_reason=reason)

    # ------------------------------------------------------------------ files

    def save(self, directory: Path) -> None:
        """Write ``config.json``, LightGBM's text model, the feature tables and the bases."""
        if self.fold_of_user is not None:
            raise ValueError("an out-of-fold validation stacker is not a servable model")
        directory = Path(directory)
        write_config(directory, self.name, {"params": self.params, "fit": self.fit_figures})
        self.boosters[0].save_model(str(directory / MODEL_FILE))
        save_arrays(directory / FEATURES_FILE, **self.features.arrays)
        for name, model in self.base_models.items():
            model.save(directory / BASES_DIR / name)

    @classmethod
    def load(
        cls, directory: Path, catalogue: Catalogue, embeddings: ImageEmbeddings | None = None
    ) -> StackedRanker:
        """Read a ranker written by :meth:`save` (bases included).

        Raises
        ------
        ValueError
            When a base needs image embeddings and none are given.
        """
        import lightgbm

        from ranking_service.rankers import load_ranker, ranker_class

        directory = Path(directory)
        config = read_config(directory, cls.name)
        ranker = cls(**config["params"])
        ranker.fit_figures = config.get("fit", {})
        for name in ranker.bases:
            if ranker_class(name).uses_embeddings and embeddings is None:
                raise ValueError(f"stacked in {directory}: its {name} base needs embeddings")
            ranker.base_models[name] = load_ranker(
                name, directory / BASES_DIR / name, catalogue, embeddings
            )
        share_popularity(ranker.base_models)
        ranker.boosters = [lightgbm.Booster(model_file=str(directory / MODEL_FILE))]
        prepare(ranker.boosters[0])  # the tree scorer built and checked now, not at a request
        ranker.features = StackFeatures(load_arrays(directory / FEATURES_FILE), embeddings)
        return ranker


def share_popularity(bases: dict[str, Ranker]) -> None:
    """Let bases whose query prior counts exactly what the popularity base counts use it.

    Then the popularity a request counts once (:func:`base_rows`) serves their priors too.
    Scores do not change: the prior is the same counts under the same parameters.
    """
    popularity = bases["popularity"]
    for model in bases.values():
        prior = getattr(model, "popularity", None)
        if (
            isinstance(prior, PopularityRanker)
            and prior is not popularity
            and same_counts(prior, popularity)
        ):
            model.popularity = popularity


def same_counts(first: PopularityRanker, second: PopularityRanker) -> bool:
    """Whether two fitted popularity rankers have the same parameters and counts."""
    arrays = ("photo_counts", "stats_rates", "keyword_ptr", "keyword_photos", "keyword_counts")
    return (
        first.params == second.params
        and first.keyword_names == second.keyword_names
        and all(np.array_equal(getattr(first, a), getattr(second, a)) for a in arrays)
    )


def base_rows(
    bases: dict[str, Ranker],
    features: StackFeatures,
    query: RankQuery,
    known: dict[str, RankScores] | None = None,
) -> tuple[np.ndarray, str]:
    """The feature rows of one query and the first fallback a personal base took.

    ``known`` holds bases' results for ``query`` already scored (by name), the others are
    scored here.
    """
    known = known or {}
    popularity = bases["popularity"]
    # The popularity base, the other bases' priors (when they share it: share_popularity)
    # and the prior feature count the query's popularity once.
    with popularity.counting_once():
        results = [known.get(name) or model.score(query) for name, model in bases.items()]
        prior = popularity.log_prior(np.asarray(query.candidates, np.int64), query.keyword)
    rows = features.rows(query, [r.scores for r in results], prior)
    reasons = [r.fallback_reason for name, r in zip(bases, results) if name != "popularity"]
    reasons.append(results[0].fallback_reason)
    return rows, next((r for r in reasons if r), "")


def stack_rows(
    queries: list[RankQuery],
    relevant: list[np.ndarray],
    bases: dict[str, Ranker],
    features: StackFeatures,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Training rows of the stacker: per query with a relevant candidate, its positives and
    up to :data:`NEGATIVES_PER_QUERY` sampled negatives; returns (features, labels, groups)."""
    return sample_rows(QueryRows.score(queries, relevant, bases, features), seed=seed)


class QueryRows:
    """The feature rows and labels of the queries a stacker can learn from, scored once.

    A query teaches the stacker only when some but not all of its candidates were converted;
    the others are left out before their bases are scored. Out-of-fold fits then draw their
    rows from these (:func:`sample_rows`) instead of scoring the bases again per fold.

    Attributes
    ----------
    index:
        Position of each kept query in the list given to :meth:`score`.
    rows, labels:
        Per kept query, its feature matrix and whether each candidate was converted.
    """

    def __init__(self, index: np.ndarray, rows: list[np.ndarray], labels: list[np.ndarray]):
        self.index = index
        self.rows = rows
        self.labels = labels

    @classmethod
    def score(
        cls,
        queries: list[RankQuery],
        relevant: list[np.ndarray],
        bases: dict[str, Ranker],
        features: StackFeatures,
    ) -> QueryRows:
        """Score the bases on each query that has converted and unconverted candidates."""
        index, rows, labels = [], [], []
        for position, (query, converted) in enumerate(zip(queries, relevant)):
            label = np.isin(query.candidates, converted)
            if not label.any() or label.all():
                continue
            index.append(position)
            rows.append(base_rows(bases, features, query)[0])
            labels.append(label)
        return cls(np.asarray(index, dtype=np.int64), rows, labels)


def sample_rows(
    scored: QueryRows, among: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The stacker's training rows from ``scored``: per query, its positives and up to
    :data:`NEGATIVES_PER_QUERY` negatives drawn with ``seed``; returns (features, labels,
    groups).

    ``among`` (positions in the list ``scored`` was built from) keeps only those queries.
    """
    rng = np.random.default_rng(seed)
    chosen = range(len(scored.index))
    if among is not None:
        chosen = np.flatnonzero(np.isin(scored.index, among))
    blocks, labels, groups = [], [], []
    for i in chosen:
        rows, label = scored.rows[i], scored.labels[i]
        negatives = np.flatnonzero(~label)
        if len(negatives) > NEGATIVES_PER_QUERY:
            negatives = rng.choice(negatives, NEGATIVES_PER_QUERY, replace=False)
        keep = np.sort(np.r_[np.flatnonzero(label), negatives])
        blocks.append(rows[keep])
        labels.append(label[keep].astype(np.int32))
        groups.append(len(keep))
    if not blocks:
        return np.zeros((0, 0)), np.zeros(0, np.int32), []
    return np.vstack(blocks), np.concatenate(labels), groups
