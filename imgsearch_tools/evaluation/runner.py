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
ranker significantly worse than the best one could have been. Per retriever,
``stacked_vs_best_single`` (header) pairs the stacked ranker with the best of the other rankers
on test (:func:`imgsearch_tools.evaluation.comparisons.stacked_vs_single`).

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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.names import RANKER_NAMES, RETRIEVER_NAMES
from imgsearch_tools.evaluation import comparisons
from imgsearch_tools.evaluation.measure import evaluate_retriever
from imgsearch_tools.evaluation.models import clip_retrievers, fit_rankers
from imgsearch_tools.evaluation.options import (
    CLIP_RETRIEVERS,
    EvalConfig,
    EvaluationError,
    resolve_names,
)
from imgsearch_tools.evaluation.queries import (
    KeywordTags,
    TestQueries,
    build_test_queries,
    pair_queries,
    user_photos,
)
from imgsearch_tools.evaluation.report import dataset_summary, jsonable
from imgsearch_tools.provenance import machine_facts

__all__ = ["EvalConfig", "EvaluationError", "evaluate", "fit_rankers", "resolve_names"]


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
            rows += evaluate_retriever(
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

    served_vs_best = comparisons.served_vs_best(rows, selection.get("default_ranker"), k, config)
    evaluated = {r["retriever"] for r in rows if "_per_query_ndcg" in r}
    default_retriever = configuration.get("retriever") or (
        "hybrid" if "hybrid" in evaluated else "keyword"
    )
    served_configuration = comparisons.served_vs_best_configuration(
        rows, default_retriever, selection.get("default_ranker"), k, config
    )
    stacked_vs_single = comparisons.stacked_vs_single(rows, default_retriever, k, config)
    retrievers_compared = comparisons.retriever_deltas(
        rows, default_retriever, selection.get("default_ranker"), k, config
    )
    comparisons.add_pairwise(rows, k, config)
    comparisons.add_deltas(rows, "popularity", k, config)
    comparisons.add_tag_deltas(rows, "keyword", k, config)
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
        "stacked_vs_best_single": stacked_vs_single,
        "default_retriever_vs_others": retrievers_compared,
        "models": models,
        "machine": machine_facts(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(["imgsearch", *sys.argv[1:]]),
        "duration_s": round(time.perf_counter() - started, 1),
        "config": jsonable(asdict(config)),
    }
    return {"header": header, "results": rows}


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
