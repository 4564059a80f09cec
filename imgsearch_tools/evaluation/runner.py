"""Offline evaluation of every retriever x ranker on a temporal split of the conversions.

The protocol (what the evaluation results page reports):

1. **Split.** Conversions sorted by ``converted_at`` (the catalogue keeps them so); the first
   ``1 - test_fraction`` of the rows *by position* train, the rest test. Splitting by position
   (not by a timestamp threshold) keeps the sizes exact; the test checks that the latest
   training time is not after the earliest test time, so nothing from the future trains.
2. **Test queries.** A (user, keyword) pair with at least ``min_pair`` test conversions whose
   user has at least one training conversion. The query text is the pair's keyword.
3. **Candidates.** The retriever under test returns ``candidates_k`` photos for the keyword.
   With ``filter_train`` (default) photos the user converted in training are removed, as a
   search engine would not re-recommend them; they stay relevant if converted again, so every
   system loses them alike.
4. **Relevant.** The distinct photos the user converted with that keyword in the test part.
   The ranking request carries the user's last 20 training photos as ``recent_photos`` and
   the country of their latest training conversion, as a client with that history would.
5. **Models.** Rankers are fitted on the training conversions only, as ``imgsearch build``
   fits them: candidates from hybrid when CLIP is available (else keyword), the validation
   slice at the end of the training part choosing their parameters and the prior's weight;
   then the served configuration (``configuration`` in the header: retriever, fusion weights
   and ranker chosen together by the rule of :mod:`imgsearch_tools.evaluation.configuration`;
   ``default_retriever`` and ``default_ranker``) and hybrid's fusion weights (used by the
   ``hybrid`` rows). CLIP learns from images and keywords, never conversions, so it is
   trained on all photos (or loaded from ``clip_artifacts``).
6. **Ordering.** The final list sorts candidates by the ranker's score, ties broken by
   retrieval order (:func:`imgsearch.ranking_metrics.rank_by_scores`).

Metrics per retriever x ranker (mean over test queries, 95% bootstrap CI over queries):
NDCG@k (binary gains), P@k (denominator k), Recall@k, and ``seed_ndcg``: the seed study's
NDCG of the ranker's scores over the pair's own converted photos with conversion counts as
gains (see :func:`imgsearch.ranking_metrics.seed_ndcg`; the photos are passed in retrieval order,
photos the retriever missed after those it found, so a ranker that cannot tell them apart
scores as retrieval order does). Per retriever, independent of the ranker:

* ``tag_p@k``: over the test queries whose keyword is a catalogue tag, the share of the
  top k *retrieved* photos (before filtering and ranking) tagged with that keyword.
* ``pair_tag_p@k``: over two-keyword queries, the share of the top k retrieved photos tagged
  with *both* words. The queries are the distinct two-word keywords of the test conversions
  whose words are both catalogue tags (in the demo: "red circle", "blue night"…); when
  there are none, pairs of the test queries' most frequent keywords. Only pairs that at least
  k photos carry are used, so a perfect score is possible.

  The tags are the catalogue's labels (``labels.tsv``: what each photo shows) when it has
  them, else its keywords (``protocol.tag_truth`` says which). Against the keywords, keyword
  retrieval scores 1 by construction: it returns exactly the photos tagged with the query's
  words, right or wrong. With labels the JSON also carries ``tag_p@k_keywords`` and
  ``pair_tag_p@k_keywords``, the same figures against the keywords. ``tag_p@k_vs_keyword``
  and ``pair_tag_p@k_vs_keyword`` (JSON) are the paired differences to keyword retrieval over
  the same queries, with a bootstrap interval.

* ``candidate_recall``: the share of relevant photos among the (filtered) candidates, the
  ceiling of Recall@``candidates_k`` that no ranker can pass; ``reachable_queries`` and
  ``ndcg@k_reachable`` (JSON only) restrict NDCG to queries with a relevant candidate.

``served_configuration_vs_best`` (header) compares the served (retriever, ranker) with the
best row of all on the test queries: the paired difference with its bootstrap interval and
the ratio of their NDCG@k. Per retriever, ``served_vs_best`` (header) compares on the test
queries the default ranker with the ranker that scored best there, and with popularity:
paired differences with bootstrap intervals, which say whether the validation rule served a
ranker significantly worse than the best one could have been.

Latency is measured in-process with ``time.perf_counter`` on the same queries: retrieval
(one ``retrieve`` call), ranking (one ``score`` call plus the final sort) and their sum per
query, reported as p50 and p99 in milliseconds.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.names import RANKER_NAMES, RETRIEVER_NAMES
from imgsearch.ranking_metrics import (
    bootstrap_ci,
    metrics_from_hits,
    paired_bootstrap_ci,
    percentiles_ms,
    rank_by_scores,
    seed_ndcg,
)
from imgsearch_tools.evaluation.queries import (
    KeywordTags,
    TestQueries,
    build_test_queries,
    pair_queries,
    user_photos,
)
from imgsearch_tools.evaluation.report import dataset_summary, jsonable, machine_summary
from retrieval_service.clip_model import TRAIN_STEPS

CLIP_RETRIEVERS = frozenset({"clip", "hybrid"})


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (unknown name, no test query, bad fraction)."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; the defaults are the documented protocol.

    Attributes
    ----------
    retrievers, rankers:
        Names to evaluate; None for all of them.
    candidates_k:
        Candidates the retriever returns per query.
    min_pair:
        Test conversions a (user, keyword) pair needs to become a test query.
    test_fraction:
        Share of the most recent conversions held out for testing.
    filter_train:
        Remove photos the user converted in training from the candidates.
    tune:
        Let the ranker trainer choose hyper-parameters on a validation slice of the training
        part (never the test part).
    clip_artifacts:
        An artifact set (or its ``clip`` folder's parent) to load CLIP from instead of training.
    clip_steps:
        Training steps when CLIP is trained here.
    max_queries:
        Evaluate at most this many test queries (a seeded draw); None for all.
    seed:
        Seed of the query draw and of the bootstrap.
    k:
        Cut-off of the metrics.
    bootstrap:
        Bootstrap resamples for the confidence intervals.
    show_progress:
        Draw progress bars on stderr.
    """

    retrievers: tuple[str, ...] | None = None
    rankers: tuple[str, ...] | None = None
    candidates_k: int = 100
    min_pair: int = 3
    test_fraction: float = 0.2
    filter_train: bool = True
    tune: bool = False
    clip_artifacts: str | None = None
    clip_steps: int = TRAIN_STEPS
    max_queries: int | None = None
    seed: int = 0
    k: int = 10
    bootstrap: int = 1000
    show_progress: bool = True


# --------------------------------------------------------------------------- models


def resolve_names(requested: Iterable[str] | None, valid: Iterable[str], kind: str) -> list[str]:
    """Check names against the valid ones; None means all of them.

    Raises
    ------
    EvaluationError
        Naming the unknown names and listing the valid ones.
    """
    valid = list(valid)
    if requested is None:
        return valid
    names = [n.strip().lower() for n in requested if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise EvaluationError(
            f"unknown {kind} {', '.join(repr(n) for n in unknown)}; valid: {', '.join(valid)}"
        )
    if not names:
        raise EvaluationError(f"no {kind} given; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def fit_rankers(
    names: list[str],
    train_catalogue: Catalogue,
    tune: bool,
    show_progress: bool,
    workdir: str | Path | None = None,
    retriever=None,
    embeddings=None,
    candidates_k: int = 100,
) -> tuple[dict, dict, object]:
    """Train each ranker on the training catalogue the way ``imgsearch build`` does, and load it.

    Training goes through ``ranking_service.training.train_rankers`` (the validation slice cut
    from the training part; tuning when ``tune``; the default ranker's selection; DeepFM's INT8
    gate) with ``retriever``'s candidates for the training keywords, as ``build`` hands them,
    and each model is saved and loaded back, so the evaluation measures exactly what the
    ranking service serves.

    Parameters
    ----------
    names:
        Ranker names.
    train_catalogue:
        The catalogue restricted to the training conversions.
    tune:
        Tune hyper-parameters first.
    show_progress:
        Show training progress.
    workdir:
        Where the models are written; a temporary folder when None.
    retriever:
        The retriever served by default; the keyword index of the catalogue when None.
    embeddings:
        The catalogue's image embeddings (``clip_profile`` is skipped without).
    candidates_k:
        Candidates per validation query, as per test query.

    Returns
    -------
    rankers : dict
        Name to loaded :class:`~ranking_service.rankers.base.Ranker`.
    info : dict
        Name to what training reported (parameters, seconds, tuning, INT8 gate), and the
        skipped rankers with the reason.
    training : ranking_service.training.TrainingReport
        The whole report (selection, validation slice and models), or None without names.
    """
    if not names:
        return {}, {}, None
    from imgsearch_tools.offline_candidates import served_candidates
    from ranking_service.rankers import load_ranker
    from ranking_service.training import train_rankers

    if retriever is None:
        from retrieval_service.keyword_index import KeywordIndex

        retriever = KeywordIndex.from_keywords(train_catalogue.keywords)
    candidates = served_candidates(train_catalogue, retriever, show_progress)
    with tempfile.TemporaryDirectory(prefix="imgsearch-rankers-") as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp)
        training = train_rankers(
            train_catalogue,
            list(names),
            out_dir,
            candidates,
            tune=tune,
            show_progress=show_progress,
            embeddings=embeddings,
            candidates_k=candidates_k,
        )
        rankers = {
            name: load_ranker(name, out_dir / name, train_catalogue, embeddings)
            for name in names
            if name in training.rankers
        }
    info = {}
    for name in names:
        if name in training.skipped:
            info[name] = {"skipped": training.skipped[name]}
            continue
        entry = dict(training.rankers.get(name, {}))
        entry.pop("history", None)  # per-epoch figures: in the artifact manifest, not here
        info[name] = jsonable(entry)
    return rankers, info, training


def clip_retrievers(
    catalogue: Catalogue,
    keyword_index,
    config: EvalConfig,
    workdir: Path,
) -> tuple[dict, str, dict]:
    """Build or load the CLIP and hybrid retrievers when the catalogue supports them.

    Torch's thread setting is left as it is (rankers train next).

    Returns
    -------
    retrievers : dict
        ``{"clip": ..., "hybrid": ...}``, empty when unavailable.
    reason : str
        Why they are unavailable ("" when available).
    info : dict
        Where CLIP came from and what building it reported; ``embeddings`` is the set's
        :class:`~imgsearch.image_embeddings.ImageEmbeddings` (not JSON: popped by the caller).
    """
    n_images = int(catalogue.photos["has_image"].sum()) if "has_image" in catalogue.photos else 0
    if n_images == 0 and not config.clip_artifacts:
        return {}, "catalogue has no images (images/<photo_id>.jpg): CLIP needs them", {}
    try:
        from imgsearch_tools.demo_data import query_families
        from retrieval_service.clip_artifacts import build_clip_artifacts
        from retrieval_service.semantic import load_clip_retrievers
    except ImportError as exc:
        return {}, f"CLIP retrieval is not available: {exc}", {}
    if config.clip_artifacts:
        set_dir = Path(config.clip_artifacts)
        if (set_dir / "current").exists():  # an artifact root: use its current set
            set_dir = (set_dir / "current").resolve()
        info = {"source": f"loaded from {set_dir}"}
        mismatch = _clip_set_mismatch(set_dir, catalogue)
        if mismatch:
            raise EvaluationError(f"--clip-artifacts {set_dir}: {mismatch}")
    else:
        set_dir = workdir / "clip_set"
        set_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        built = build_clip_artifacts(
            catalogue,
            set_dir,
            None,
            train_steps=config.clip_steps,
            show_progress=config.show_progress,
            query_families=query_families(catalogue),
        )
        if "skipped" in built:
            return {}, str(built["skipped"]), {}
        info = {
            "source": f"trained here on all photos' images and keywords, {config.clip_steps} steps",
            "build_s": round(time.perf_counter() - start, 1),
            "build": jsonable(built),
        }
    # No query-embedding cache and no stored keyword embeddings: every query pays for its text
    # encoding, so the latency figures are the uncached worst case rather than a hit rate.
    loaded = load_clip_retrievers(
        set_dir, keyword_index, threads=None, cache_size=0, known_queries=False
    )
    if not loaded:
        return {}, f"no CLIP artifacts (clip/, embeddings, vector index) in {set_dir}", info
    from imgsearch.artifacts import EMBEDDINGS
    from imgsearch.image_embeddings import ImageEmbeddings

    info["embeddings"] = ImageEmbeddings.load(set_dir / EMBEDDINGS)
    return {n: loaded[n] for n in CLIP_RETRIEVERS if n in loaded}, "", info


def _clip_set_mismatch(set_dir: Path, catalogue: Catalogue) -> str:
    """Why a CLIP artifact set cannot belong to this catalogue ("" when it may)."""
    from imgsearch.artifacts import CATALOGUE_DIR, EMBEDDINGS

    photos_table = set_dir / CATALOGUE_DIR / "photos.parquet"
    if photos_table.exists():  # a full artifact set: compare the photo ids themselves
        ids = pd.read_parquet(photos_table, columns=["photo_id"])["photo_id"].astype(str)
        if ids.tolist() != catalogue.photos["photo_id"].astype(str).tolist():
            return "its catalogue's photo ids differ from this catalogue's"
        return ""
    path = set_dir / EMBEDDINGS
    if not path.exists():
        return ""  # reported as "no CLIP artifacts" after loading
    with np.load(path, allow_pickle=False) as data:
        photo_idx = data["photo_idx"]
    if len(photo_idx) and int(photo_idx.max()) >= catalogue.n_photos:
        return (
            f"its embeddings index photos up to {int(photo_idx.max())}, but the catalogue has "
            f"{catalogue.n_photos} photos: it was built for another catalogue"
        )
    return ""


# --------------------------------------------------------------------------- evaluation


@dataclass
class _Collected:
    """Per-query outcomes of one retriever x ranker."""

    top: list[np.ndarray] = field(default_factory=list)
    seed: list[float] = field(default_factory=list)
    ranking_s: list[float] = field(default_factory=list)
    fallbacks: Counter = field(default_factory=Counter)


def _retrieved_order_scores(
    relevant: np.ndarray, retrieved: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Relevant photos in retrieval order (missed ones last) with retrieval-like scores."""
    position = {p: i for i, p in enumerate(retrieved.tolist())}
    floor = (float(np.min(scores)) - 1.0) if len(scores) else 0.0
    keyed = sorted(relevant.tolist(), key=lambda p: (position.get(p, len(position)), p))
    photos = np.asarray(keyed, dtype=np.int64)
    rscores = np.asarray(
        [float(scores[position[p]]) if p in position else floor for p in keyed], dtype=np.float32
    )
    return photos, rscores


def evaluate(
    catalogue: Catalogue,
    config: EvalConfig = EvalConfig(),
    *,
    retrievers: dict | None = None,
    rankers: dict | None = None,
    command: str | None = None,
) -> dict:
    """Run the offline evaluation and return the report.

    Parameters
    ----------
    catalogue:
        The whole catalogue (all conversions); it is split here.
    config:
        What to evaluate.
    retrievers:
        Prepared retrievers by name, used instead of building them (e.g. by tests or a caller
        that loaded an artifact set built on the same split).
    rankers:
        Rankers by name already fitted on this split's training part, used instead of fitting.
    command:
        The command line to record; ``sys.argv`` by default.

    Returns
    -------
    dict
        ``{"header": {...}, "results": [row, ...]}`` with one row per retriever x ranker;
        rows a catalogue cannot support carry ``skipped`` with the reason.

    Raises
    ------
    EvaluationError
        Unknown names (the message lists the valid ones), a bad fraction, or no test query.
    """
    started = time.perf_counter()
    k = config.k
    retriever_names = resolve_names(config.retrievers, RETRIEVER_NAMES, "retriever")
    ranker_names = resolve_names(config.rankers, RANKER_NAMES, "ranker")

    if not 0.0 < config.test_fraction < 1.0:
        raise EvaluationError(f"test_fraction must be in (0, 1), got {config.test_fraction}")
    split = temporal_split(catalogue.conversions, config.test_fraction)
    queries = build_test_queries(split, config.min_pair, config.max_queries, config.seed)
    if len(queries) == 0:
        raise EvaluationError(
            f"no test query: no (user, keyword) pair has {config.min_pair} or more of the "
            f"{len(split.later)} test conversions with a user seen in training; "
            "lower --min-pair or raise --test-fraction"
        )
    train_catalogue = catalogue.with_conversions(split.earlier)
    seen = user_photos(split.earlier) if config.filter_train else {}
    no_photos = np.zeros(0, np.int64)

    skipped: dict[str, str] = {}
    models: dict = {}
    selection: dict = {}
    with tempfile.TemporaryDirectory(prefix="imgsearch-eval-") as tmp:
        from retrieval_service.keyword_index import KeywordIndex

        active = dict(retrievers or {})
        if "keyword" not in active:
            active["keyword"] = KeywordIndex.from_keywords(catalogue.keywords)
        keyword_index = active["keyword"]
        fitted = dict(rankers or {})
        to_fit = [n for n in ranker_names if n not in fitted]
        # CLIP first: the build trains rankers on hybrid's candidates when it can, and
        # clip_profile (and stacked's clip_profile base) needs the image embeddings.
        wanted_clip = [n for n in retriever_names if n in CLIP_RETRIEVERS and n not in active]
        built, embeddings = {}, None
        if wanted_clip or {"clip_profile", "stacked"} & set(to_fit):
            built, reason, models["clip"] = clip_retrievers(
                train_catalogue, keyword_index, config, Path(tmp)
            )
            embeddings = models["clip"].pop("embeddings", None)
            for name in wanted_clip:
                if name in built:
                    active[name] = built[name]
                else:
                    skipped[name] = reason or f"{name} retriever was not built"
        fitted_now, models["rankers"], training = fit_rankers(
            to_fit,
            train_catalogue,
            config.tune,
            config.show_progress,
            Path(tmp) / "rankers",
            retriever=built.get("hybrid", keyword_index),
            embeddings=embeddings,
            candidates_k=config.candidates_k,
        )
        fitted.update(fitted_now)
        for name in ranker_names:
            if name not in fitted:
                skipped_ranker = models["rankers"].get(name, {}).get("skipped", "not trained")
                skipped[f"ranker:{name}"] = skipped_ranker
        ranker_names = [n for n in ranker_names if n in fitted]
        configuration: dict = {}
        if training is not None:
            selection = training.selection
            configuration = _choose_configuration(
                train_catalogue, training, keyword_index, built, active, config
            )
            models["fusion"] = configuration.get("fusion", {})
            selection = {
                **selection,
                "default_ranker": configuration["ranker"],
                "reason": configuration["reason"],
            }
        if built:
            from retrieval_service.semantic import set_serving_threads

            set_serving_threads()  # latency measured as served: one torch/FAISS thread

        keyword_tags = KeywordTags(catalogue.keywords, catalogue.n_photos)
        truth, tag_truth = catalogue.truth_tags()
        tags = keyword_tags if tag_truth == "keywords" else KeywordTags(truth, catalogue.n_photos)
        keyword_counts = Counter(queries.keyword.tolist())
        pairs, pair_source = pair_queries(
            tags, split.later, [w for w, _ in keyword_counts.most_common()], k
        )

        rows = []
        for retriever_name in retriever_names:
            if retriever_name in skipped:
                rows += [
                    {"retriever": retriever_name, "ranker": r, "skipped": skipped[retriever_name]}
                    for r in ranker_names
                ]
                continue
            rows += _evaluate_retriever(
                retriever_name,
                active[retriever_name],
                {n: fitted[n] for n in ranker_names},
                queries,
                seen,
                no_photos,
                tags,
                pairs,
                config,
                keyword_tags if tags is not keyword_tags else None,
            )

    served_vs_best = _served_vs_best(rows, selection.get("default_ranker"), k, config)
    evaluated = {r["retriever"] for r in rows if "_per_query_ndcg" in r}
    default_retriever = configuration.get("retriever") or (
        "hybrid" if "hybrid" in evaluated else "keyword"
    )
    served_configuration = served_vs_best_configuration(
        rows, default_retriever, selection.get("default_ranker"), k, config
    )
    retrievers_compared = _retriever_deltas(
        rows, default_retriever, selection.get("default_ranker"), k, config
    )
    _add_pairwise(rows, k, config)
    _add_deltas(rows, "popularity", k, config)
    _add_tag_deltas(rows, "keyword", k, config)
    rows += [
        {"retriever": "*", "ranker": name.removeprefix("ranker:"), "skipped": reason}
        for name, reason in skipped.items()
        if name.startswith("ranker:")
    ]
    header = {
        "dataset": dataset_summary(catalogue),
        "split": split.summary(),
        "protocol": {
            "k": k,
            "candidates_k": config.candidates_k,
            "min_pair": config.min_pair,
            "filter_train": config.filter_train,
            "tune": config.tune,
            "max_queries": config.max_queries,
            "seed": config.seed,
            "bootstrap_resamples": config.bootstrap,
            "queries": len(queries),
            "qualifying_pairs": queries.n_pairs_total,
            "distinct_query_keywords": len(keyword_counts),
            "relevant_seen_in_train": _seen_share(queries, seen),
            "pair_queries": len(pairs),
            "pair_query_source": pair_source,
            "tag_truth": tag_truth,
        },
        "default_ranker": selection.get("default_ranker"),
        "default_retriever": default_retriever,
        "default_ranker_reason": selection.get("reason", "rankers were given already fitted"),
        "configuration": configuration,
        "served_configuration_vs_best": served_configuration,
        "ranker_selection": selection,
        "served_vs_best": served_vs_best,
        "default_retriever_vs_others": retrievers_compared,
        "models": models,
        "machine": machine_summary(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(["imgsearch", *sys.argv[1:]]),
        "duration_s": round(time.perf_counter() - started, 1),
        "config": jsonable(asdict(config)),
    }
    return {"header": header, "results": rows}


def _evaluate_retriever(
    retriever_name: str,
    retriever,
    rankers: dict,
    queries: TestQueries,
    seen: dict[int, np.ndarray],
    no_photos: np.ndarray,
    tags: KeywordTags,
    pairs: list[tuple[str, str, str]],
    config: EvalConfig,
    keyword_tags: KeywordTags | None = None,
) -> list[dict]:
    """All rows of one retriever: every ranker over the same retrieved candidates.

    ``tags`` is the truth of the tag figures; ``keyword_tags``, when given, the catalogue's
    keywords for the same figures against them (``*_keywords``).
    """
    from tqdm import tqdm

    from ranking_service.rankers.base import RankQuery

    k = config.k
    collected = {name: _Collected() for name in rankers}
    retrieval_s = np.zeros(len(queries))
    candidate_recall = np.zeros(len(queries))
    tag_precisions, keyword_tag_precisions = [], []
    if len(queries):
        # One untimed warm-up per stage: first calls pay for lazy loading and allocation.
        _warm = retriever.retrieve(str(queries.keyword[0]), config.candidates_k)
        for ranker in rankers.values():
            ranker.score(
                RankQuery(
                    int(queries.user_idx[0]),
                    str(queries.keyword[0]),
                    _warm.photo_idx.astype(np.int64),
                    _warm.scores.astype(np.float32),
                )
            )
    progress = tqdm(
        range(len(queries)),
        desc=f"evaluating {retriever_name}",
        unit="query",
        file=sys.stderr,
        disable=not config.show_progress,
    )
    for q in progress:
        user, keyword = int(queries.user_idx[q]), str(queries.keyword[q])
        start = time.perf_counter()
        result = retriever.retrieve(keyword, config.candidates_k)
        retrieval_s[q] = time.perf_counter() - start
        retrieved = np.asarray(result.photo_idx, dtype=np.int64)
        scores = np.asarray(result.scores, dtype=np.float32)
        if keyword in tags:
            tag_precisions.append(tags.precision(retrieved, [keyword], k))
            if keyword_tags is not None:
                keyword_tag_precisions.append(keyword_tags.precision(retrieved, [keyword], k))
        candidates, cand_scores = retrieved, scores
        if config.filter_train:
            keep = ~np.isin(retrieved, seen.get(user, no_photos), assume_unique=True)
            candidates, cand_scores = retrieved[keep], scores[keep]
        n_rel = len(queries.relevant[q])
        candidate_recall[q] = np.isin(queries.relevant[q], candidates).sum() / n_rel
        relevant_photos, relevant_scores = _retrieved_order_scores(
            queries.relevant[q], retrieved, scores
        )
        gains = queries.counts[q][np.searchsorted(queries.relevant[q], relevant_photos)]
        for name, ranker in rankers.items():
            out = collected[name]
            request = RankQuery(
                user_idx=user,
                keyword=keyword,
                candidates=candidates,
                retrieval_scores=cand_scores,
                recent_photos=queries.recent[q],
                country=str(queries.country[q]),
            )
            start = time.perf_counter()
            ranked = ranker.score(request)
            top = rank_by_scores(candidates, ranked.scores)[:k]
            out.ranking_s.append(time.perf_counter() - start)
            out.top.append(top)
            if ranked.fallback_reason:
                out.fallbacks[ranked.fallback_reason] += 1
            own = ranker.score(
                RankQuery(
                    user_idx=user,
                    keyword=keyword,
                    candidates=relevant_photos,
                    retrieval_scores=relevant_scores,
                    recent_photos=queries.recent[q],
                    country=str(queries.country[q]),
                )
            )
            out.seed.append(seed_ndcg(own.scores, gains))

    pair_precisions, keyword_pair_precisions = [], []
    for query, first, second in pairs:
        result = retriever.retrieve(query, config.candidates_k)
        pair_precisions.append(tags.precision(result.photo_idx, [first, second], k))
        if keyword_tags is not None:
            keyword_pair_precisions.append(
                keyword_tags.precision(result.photo_idx, [first, second], k)
            )

    def mean_of(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    tag_p, pair_p = mean_of(tag_precisions), mean_of(pair_precisions)

    rows = []
    for name, out in collected.items():
        hits = np.zeros((len(queries), k), dtype=bool)
        for q, top in enumerate(out.top):
            hits[q, : len(top)] = np.isin(top, queries.relevant[q])
        n_relevant = np.asarray([len(r) for r in queries.relevant], dtype=np.int64)
        per_query = metrics_from_hits(hits, n_relevant)
        per_query["seed"] = np.asarray(out.seed)
        ranking_s = np.asarray(out.ranking_s)
        row = {"retriever": retriever_name, "ranker": name, "queries": len(queries)}
        for key, values in (
            (f"ndcg@{k}", per_query["ndcg"]),
            (f"p@{k}", per_query["precision"]),
            (f"recall@{k}", per_query["recall"]),
            ("seed_ndcg", per_query["seed"]),
        ):
            mean, lo, hi = bootstrap_ci(values, n=config.bootstrap, seed=config.seed)
            row[key] = mean
            row[f"{key}_ci"] = [lo, hi]
        row["candidate_recall"] = float(candidate_recall.mean())
        # The same NDCG over the queries with at least one relevant candidate: what the rankers
        # can change (the rankers' own validation NDCG is computed this way).
        reachable = candidate_recall > 0
        row["reachable_queries"] = int(reachable.sum())
        row[f"ndcg@{k}_reachable"] = (
            float(per_query["ndcg"][reachable].mean()) if reachable.any() else float("nan")
        )
        row[f"tag_p@{k}"] = tag_p
        row["tag_queries"] = len(tag_precisions)
        row[f"pair_tag_p@{k}"] = pair_p
        row["pair_queries"] = len(pair_precisions)
        if keyword_tags is not None:
            row[f"tag_p@{k}_keywords"] = mean_of(keyword_tag_precisions)
            row[f"pair_tag_p@{k}_keywords"] = mean_of(keyword_pair_precisions)
        row["latency_ms"] = {
            "retrieval": percentiles_ms(retrieval_s),
            "ranking": percentiles_ms(ranking_s),
            "total": percentiles_ms(retrieval_s + ranking_s),
        }
        row["fallbacks"] = int(sum(out.fallbacks.values()))
        row["fallback_reasons"] = dict(out.fallbacks.most_common(3))
        row["_per_query_ndcg"] = per_query["ndcg"]
        row["_per_query_tags"] = (np.asarray(tag_precisions), np.asarray(pair_precisions))
        rows.append(row)
    return rows


def _choose_configuration(train_catalogue, training, keyword_index, built, active, config):
    """Choose the served configuration on the validation slice, as ``imgsearch build`` does;
    the ``hybrid`` rows then fuse with the weights chosen for hybrid."""
    from imgsearch_tools.evaluation.configuration import served_configuration
    from retrieval_service.semantic import HybridRetriever

    configuration = served_configuration(
        train_catalogue,
        training,
        keyword_index,
        built.get("clip"),
        candidates_k=config.candidates_k,
    )
    weights = (configuration.get("fusion") or {}).get("weights") or configuration.get("weights")
    if weights and "hybrid" in active and "clip" in built:
        active["hybrid"] = HybridRetriever(
            keyword_index, built["clip"], method="rrf", weights=tuple(weights)
        )
    return configuration


def served_vs_best_configuration(
    rows: list[dict], retriever: str, ranker: str | None, k: int, config: EvalConfig
) -> dict:
    """The served (retriever, ranker) against the best row of all on test: paired difference,
    its interval and the ratio of their NDCG@k ({} when the served row was not evaluated)."""
    mine = {(r["retriever"], r["ranker"]): r for r in rows if "_per_query_ndcg" in r}
    served = mine.get((retriever, ranker))
    if served is None:
        return {}
    best = max(mine.values(), key=lambda r: r[f"ndcg@{k}"])
    ratio = served[f"ndcg@{k}"] / best[f"ndcg@{k}"] if best[f"ndcg@{k}"] > 0 else None
    paired = _paired(served, best, config)
    return {
        "served": {"retriever": retriever, "ranker": ranker, f"ndcg@{k}": served[f"ndcg@{k}"]},
        "best": {
            "retriever": best["retriever"],
            "ranker": best["ranker"],
            f"ndcg@{k}": best[f"ndcg@{k}"],
        },
        "vs_best": paired,
        "ratio": ratio,
        "significantly_below": paired["ci"][1] < 0,
    }


def _served_vs_best(rows: list[dict], served: str | None, k: int, config: EvalConfig) -> dict:
    """Per retriever: the served default against the best ranker on test, and popularity."""
    out: dict = {}
    if not served:
        return out
    for retriever in dict.fromkeys(r["retriever"] for r in rows):
        mine = {
            r["ranker"]: r for r in rows if r["retriever"] == retriever and "_per_query_ndcg" in r
        }
        if served not in mine:
            continue
        best = max(mine.values(), key=lambda r: r[f"ndcg@{k}"])
        entry = {"served": served, "best": best["ranker"]}
        for name, other in (("best", best), ("popularity", mine.get("popularity"))):
            if other is None:
                continue
            entry[f"vs_{name}"] = _paired(mine[served], other, config)
        out[retriever] = entry
    return out


def _retriever_deltas(
    rows: list[dict], retriever: str, ranker: str | None, k: int, config: EvalConfig
) -> dict:
    """The default retriever against each other one, with the default ranker, same queries.

    Paired NDCG@k differences with bootstrap intervals, and each retriever's tag precision.
    """
    mine = {r["retriever"]: r for r in rows if r["ranker"] == ranker and "_per_query_ndcg" in r}
    if retriever not in mine:
        return {}
    out = {"retriever": retriever, "ranker": ranker, "versus": {}}
    for other, row in mine.items():
        if other == retriever:
            continue
        out["versus"][other] = {
            f"ndcg@{k}_diff": _paired(mine[retriever], row, config),
            f"tag_p@{k}": row[f"tag_p@{k}"],
            f"pair_tag_p@{k}": row[f"pair_tag_p@{k}"],
        }
    out[f"tag_p@{k}"] = mine[retriever][f"tag_p@{k}"]
    out[f"pair_tag_p@{k}"] = mine[retriever][f"pair_tag_p@{k}"]
    return out


def _paired(row: dict, other: dict, config: EvalConfig) -> dict:
    """``row`` minus ``other`` on the same queries: mean NDCG difference and bootstrap CI."""
    diff, lo, hi = paired_bootstrap_ci(
        row["_per_query_ndcg"], other["_per_query_ndcg"], n=config.bootstrap, seed=config.seed
    )
    return {"diff": diff, "ci": [lo, hi]}


def _add_pairwise(rows: list[dict], k: int, config: EvalConfig) -> None:
    """Add to each row its paired NDCG difference to every other ranker on the same retriever.

    ``ndcg@k_paired`` (JSON) maps the other ranker to ``{"diff", "ci"}``: this row minus it.
    """
    for row in rows:
        if "_per_query_ndcg" not in row:
            continue
        paired = {}
        for other in rows:
            if other is row or other["retriever"] != row["retriever"]:
                continue
            if "_per_query_ndcg" not in other:
                continue
            paired[other["ranker"]] = _paired(row, other, config)
        row[f"ndcg@{k}_paired"] = paired


def _add_deltas(rows: list[dict], baseline: str, k: int, config: EvalConfig) -> None:
    """Add each row's paired NDCG difference to ``baseline`` on the same retriever."""
    key = f"ndcg@{k}"
    base = {
        r["retriever"]: r["_per_query_ndcg"]
        for r in rows
        if r["ranker"] == baseline and "_per_query_ndcg" in r
    }
    for row in rows:
        values = row.pop("_per_query_ndcg", None)
        if values is None or row["retriever"] not in base or row["ranker"] == baseline:
            continue
        diff, lo, hi = paired_bootstrap_ci(
            values, base[row["retriever"]], n=config.bootstrap, seed=config.seed
        )
        row[f"{key}_vs_{baseline}"] = {"diff": diff, "ci": [lo, hi]}


def _add_tag_deltas(rows: list[dict], baseline: str, k: int, config: EvalConfig) -> None:
    """Add the paired difference of each retriever's tag figures to ``baseline`` retriever's.

    Every retriever answers the same tag and pair queries, so the per-query precisions pair up.
    """
    base = next((r["_per_query_tags"] for r in rows if r["retriever"] == baseline), None)
    for row in rows:
        values = row.pop("_per_query_tags", None)
        if values is None or base is None or row["retriever"] == baseline:
            continue
        for key, mine, theirs in (
            (f"tag_p@{k}", values[0], base[0]),
            (f"pair_tag_p@{k}", values[1], base[1]),
        ):
            if len(mine) and len(mine) == len(theirs):
                diff, lo, hi = paired_bootstrap_ci(
                    mine, theirs, n=config.bootstrap, seed=config.seed
                )
                row[f"{key}_vs_{baseline}"] = {"diff": diff, "ci": [lo, hi]}


def _seen_share(queries: TestQueries, seen: dict[int, np.ndarray]) -> float | None:
    """Share of relevant (user, photo) items the user had already converted in training."""
    if not seen:
        return None
    total = sum(len(r) for r in queries.relevant)
    hit = sum(
        int(np.isin(r, seen.get(int(u), np.zeros(0, np.int64))).sum())
        for u, r in zip(queries.user_idx, queries.relevant)
    )
    return round(hit / total, 4) if total else None
