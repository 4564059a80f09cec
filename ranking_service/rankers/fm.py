"""The ``fm`` ranker: a Factorization Machine over query and photo fields, trained with BPR.

Also holds what FM and DeepFM share: the BPR training loop, early stopping on validation
NDCG@10, the blend with the query's popularity prior, scoring and saving. The network is in
:mod:`~ranking_service.rankers.fm_model`, the training tensors and negative sampling in
:mod:`~ranking_service.rankers.bpr_data`; :mod:`ranking_service.rankers.deepfm` adds the MLP.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.cpu import torch_threads
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.base import Ranker, RankQuery, RankScores
from ranking_service.rankers.bpr_data import NEGATIVE_SAMPLING, BPRTrainingData
from ranking_service.rankers.common import (
    as_candidates,
    finalize_scores,
    known_photo_mask,
    load_arrays,
    read_config,
    save_arrays,
    write_config,
)
from ranking_service.rankers.early_stopping import EarlyStopping
from ranking_service.rankers.features import FieldEncoder
from ranking_service.rankers.fm_model import FactorizationMachine
from ranking_service.rankers.prior import QueryPrior
from ranking_service.rankers.validation import ValidationSet

MODEL_FILE = "model.pt"
ENCODER_FILE = "encoder.npz"


class FMRanker(QueryPrior, Ranker):
    """Factorization Machine ranker over user, keyword, country, photo and photo side fields.

    BPR-trained so that each conversion's photo outscores negatives from its keyword's
    candidates (what the query would retrieve) and from all photos; its score is blended with
    the query's popularity prior. The fields, the loss and the early stopping are described in
    the docs site's build guide ("The rankers").

    Parameters
    ----------
    factors:
        Embedding size.
    epochs:
        Most training epochs.
    batch_size:
        Conversions per step.
    max_epoch_conversions:
        Most conversions per epoch, drawn anew each epoch (0: all of them).
    learning_rate:
        Adam's step size.
    l2:
        Weight of the L2 penalty on the embeddings of each batch (per conversion).
    keyword_negatives, uniform_negatives:
        Negatives per conversion from its keyword's candidates and from all photos.
    negative_sampling:
        How the negatives from all photos are drawn: ``"uniform"`` or ``"popularity"``.
    negative_pool:
        Hard negatives come from the keyword's top ``negative_pool`` candidates. Not from the
        top ``candidates_k`` only: conversions land on any photo matching the keyword, and
        negatives drawn from a narrower set than the positives teach the model to spot that
        set (e.g. high tag confidence) instead of the user's taste.
    patience:
        Clearly worse epochs in a row before stopping: worse than the best by more than the
        validation set's noise (:class:`~ranking_service.rankers.early_stopping.EarlyStopping`).
    validation_fraction:
        Share of the (time-sorted) conversions held out for early stopping; 0 disables it.
    max_validation_queries:
        Validation (user, keyword) pairs scored per epoch.
    validation_candidates_k:
        Candidates per validation query.
    refit:
        Retrain on all conversions for the best epoch count after early stopping.
    seed:
        Seed of initialisation, shuffling and negative sampling.
    min_user_conversions, min_keyword_conversions:
        Rarer users / keywords share the unknown id.
    init_std:
        Standard deviation of the initial embeddings.
    optimizer:
        ``"adam"`` or ``"adagrad"``.
    num_threads:
        Torch threads while training (restored afterwards); 0 keeps the process's setting.
        One by default: OpenMP threads spin-waiting for a busy shared core slow training down
        (measured on the docs site's models results page).
    photo_tags:
        Size of the tag field's bag: each photo's most confident keywords (0 turns it off).
    clip_dims:
        Dimensions of the dense CLIP field when image embeddings are given (0 turns it off).
    popularity:
        Parameters of the :class:`PopularityRanker` of the query prior.
    popularity_weight:
        Weight of the query's popularity prior next to the model's score (0: none).
    """

    name = "fm"

    def __init__(
        self,
        factors: int = 32,
        epochs: int = 10,
        batch_size: int = 4096,
        max_epoch_conversions: int = 1_000_000,
        learning_rate: float = 0.003,
        l2: float = 0.01,
        keyword_negatives: int = 1,
        uniform_negatives: int = 1,
        negative_pool: int = 2000,
        patience: int = 2,
        validation_fraction: float = 0.1,
        max_validation_queries: int = 2000,
        validation_candidates_k: int = 100,
        refit: bool = True,
        seed: int = 0,
        min_user_conversions: int = 1,
        min_keyword_conversions: int = 1,
        init_std: float = 0.05,
        optimizer: str = "adam",
        num_threads: int = 1,
        photo_tags: int = 10,
        negative_sampling: str = "uniform",
        clip_dims: int = 16,
        popularity: dict | None = None,
        popularity_weight: float = 0.0,
    ) -> None:
        self.factors = int(factors)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.max_epoch_conversions = int(max_epoch_conversions)
        self.learning_rate = float(learning_rate)
        self.l2 = float(l2)
        self.keyword_negatives = int(keyword_negatives)
        self.uniform_negatives = int(uniform_negatives)
        self.negative_pool = int(negative_pool)
        self.patience = int(patience)
        self.validation_fraction = float(validation_fraction)
        self.max_validation_queries = int(max_validation_queries)
        self.validation_candidates_k = int(validation_candidates_k)
        self.refit = bool(refit)
        self.seed = int(seed)
        self.min_user_conversions = int(min_user_conversions)
        self.min_keyword_conversions = int(min_keyword_conversions)
        self.init_std = float(init_std)
        if optimizer not in ("adam", "adagrad"):
            raise ValueError(f"optimizer must be 'adam' or 'adagrad', got {optimizer!r}")
        self.optimizer = optimizer
        self.num_threads = int(num_threads)
        self.photo_tags = int(photo_tags)
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"negative_sampling must be one of {', '.join(NEGATIVE_SAMPLING)}, "
                f"got {negative_sampling!r}"
            )
        self.negative_sampling = negative_sampling
        self.clip_dims = int(clip_dims)
        self.init_prior(popularity, popularity_weight)
        self.embeddings: ImageEmbeddings | None = None
        if self.keyword_negatives + self.uniform_negatives < 1:
            raise ValueError("need at least one negative per conversion")
        self.encoder: FieldEncoder | None = None
        self.model: FactorizationMachine | None = None
        self.best_epoch = 0
        self.history: list[dict] = []

    @property
    def params(self) -> dict:
        """The constructor parameters."""
        return {
            "factors": self.factors,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_epoch_conversions": self.max_epoch_conversions,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "keyword_negatives": self.keyword_negatives,
            "uniform_negatives": self.uniform_negatives,
            "negative_pool": self.negative_pool,
            "patience": self.patience,
            "validation_fraction": self.validation_fraction,
            "max_validation_queries": self.max_validation_queries,
            "validation_candidates_k": self.validation_candidates_k,
            "refit": self.refit,
            "seed": self.seed,
            "min_user_conversions": self.min_user_conversions,
            "min_keyword_conversions": self.min_keyword_conversions,
            "init_std": self.init_std,
            "optimizer": self.optimizer,
            "num_threads": self.num_threads,
            "photo_tags": self.photo_tags,
            "negative_sampling": self.negative_sampling,
            "clip_dims": self.clip_dims,
            **self.prior_params(),
        }

    def build_model(self, encoder: FieldEncoder) -> FactorizationMachine:
        """Return a freshly initialised network for ``encoder``'s fields."""
        return FactorizationMachine(encoder, self.factors, self.init_std)

    def scoring_model(self) -> nn.Module:
        """Return the network that serves requests."""
        assert self.model is not None, "the ranker is not fitted"
        return self.model

    def _start(self, catalogue: Catalogue) -> None:
        """Build vocabularies and a fresh network for ``catalogue`` (seeded)."""
        torch.manual_seed(self.seed)
        self.encoder = FieldEncoder.fit(
            catalogue,
            self.min_user_conversions,
            self.min_keyword_conversions,
            self.photo_tags,
            self.embeddings,
            self.clip_dims,
        )
        self.model = self.build_model(self.encoder)
        self.fit_prior(catalogue)

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
        validation: ValidationSet | None = None,
    ) -> FMRanker:
        """Train with BPR on ``catalogue.conversions`` (see the class docstring).

        Parameters
        ----------
        catalogue:
            The catalogue; ``conversions`` are the training ones.
        show_progress:
            Show a tqdm bar per epoch and a line of figures after it.
        candidates:
            The served retriever's candidates for the conversions' keywords: hard negatives
            and the early-stopping queries come from them. Required unless
            ``keyword_negatives`` is 0 and there is no validation.
        embeddings:
            The catalogue's image embeddings, for the dense CLIP field (None: no such field).
        validation:
            Queries to early-stop on instead of cutting the last ``validation_fraction`` of the
            conversions (tuning passes its own); the best epoch's weights are kept, no refit.
        """
        needs_validation = validation is None and self.validation_fraction > 0
        if candidates is None:
            if self.keyword_negatives > 0 or needs_validation:
                raise ValueError(
                    f"{self.name} needs the retriever's candidate lists for its keyword "
                    "negatives and early stopping (set keyword_negatives=0 and "
                    "validation_fraction=0 to train without)"
                )
            candidates = CandidateLists([], np.zeros(1, np.int64), [], [])
        self.embeddings = embeddings
        with torch_threads(self.num_threads):
            return self._fit(catalogue, show_progress, candidates, validation)

    def _fit(
        self,
        catalogue: Catalogue,
        show_progress: bool,
        candidates: CandidateLists,
        validation: ValidationSet | None,
    ) -> FMRanker:
        self.history = []
        train_catalogue = catalogue
        own_validation = validation is None and self.validation_fraction > 0
        if own_validation:
            split = temporal_split(catalogue.conversions, self.validation_fraction)
            train_catalogue = catalogue.with_conversions(split.earlier)
            validation = ValidationSet.build(
                train_catalogue,
                split.later,
                candidates,
                candidates_k=self.validation_candidates_k,
                max_queries=self.max_validation_queries,
                seed=self.seed,
            )
        if validation is not None and len(validation) == 0:
            validation, train_catalogue = None, catalogue
        self._start(train_catalogue)
        data = BPRTrainingData(
            self.encoder, train_catalogue, candidates, self.negative_pool, self.negative_sampling
        )
        rng = np.random.default_rng(self.seed)
        optimizer = self._optimizer()
        stopping, best_state = EarlyStopping(self.patience), None
        for epoch in range(1, self.epochs + 1):
            loss = self._train_epoch(data, optimizer, rng, epoch, show_progress)
            entry = {"epoch": epoch, "loss": loss}
            if validation is not None:
                per_query = validation.per_query_ndcg(self)
                entry["validation_ndcg"] = float(per_query.mean())
                if stopping.update(epoch, per_query):
                    best_state = copy.deepcopy(self.model.state_dict())
                    self.best_epoch = epoch
            else:
                self.best_epoch = epoch
            self.history.append(entry)
            if show_progress:
                tqdm.write(f"{self.name} epoch {epoch}: " + _format_entry(entry))
            if validation is not None and stopping.should_stop:
                break
        if validation is None:
            return self
        if not (own_validation and self.refit):
            self.model.load_state_dict(best_state)
            return self
        self._start(catalogue)
        data = BPRTrainingData(
            self.encoder, catalogue, candidates, self.negative_pool, self.negative_sampling
        )
        rng = np.random.default_rng(self.seed)
        optimizer = self._optimizer()
        for epoch in range(1, self.best_epoch + 1):
            self._train_epoch(data, optimizer, rng, epoch, show_progress, label="refit epoch")
        return self

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (one for FM; DeepFM decays its MLP)."""
        return [{"params": list(self.model.parameters())}]

    def _optimizer(self) -> torch.optim.Optimizer:
        """Return the optimizer named by ``optimizer`` over :meth:`parameter_groups`."""
        if self.optimizer == "adagrad":
            return torch.optim.Adagrad(self.parameter_groups(), lr=self.learning_rate)
        return torch.optim.Adam(self.parameter_groups(), lr=self.learning_rate)

    def _train_epoch(
        self,
        data: BPRTrainingData,
        optimizer: torch.optim.Optimizer,
        rng: np.random.Generator,
        epoch: int,
        show_progress: bool,
        label: str = "epoch",
    ) -> float:
        """Run one BPR epoch; return the mean loss."""
        self.model.train()
        order = rng.permutation(len(data))[: self.max_epoch_conversions or None]
        negatives = torch.from_numpy(
            data.sample_negatives(order, rng, self.keyword_negatives, self.uniform_negatives)
        )
        order = torch.from_numpy(order)
        total, steps = 0.0, 0
        batches = range(0, len(order), self.batch_size)
        bar = tqdm(
            batches, desc=f"{self.name} {label} {epoch}", disable=not show_progress, leave=False
        )
        for start in bar:
            rows = order[start : start + self.batch_size]
            drawn = negatives[start : start + self.batch_size]  # row i was drawn for order[i]
            photos = torch.cat([data.photo_rows[rows].unsqueeze(1), drawn], dim=1)
            scores, context_emb, photo_emb = self.model.score_with_embeddings(
                data.context[rows], photos
            )
            margin = scores[:, :1] - scores[:, 1:]
            real = (photos[:, 1:] != photos[:, :1]).float()  # a negative equal to the positive
            loss = (F.softplus(-margin) * real).sum() / real.sum().clamp(min=1.0)
            penalty = (context_emb.pow(2).sum() + photo_emb.pow(2).sum()) / len(rows)
            optimizer.zero_grad(set_to_none=True)
            (loss + self.l2 * penalty).backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if show_progress and steps % 20 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        self.model.eval()
        return total / max(steps, 1)

    def score(self, query: RankQuery) -> RankScores:
        """Score ``query.candidates``; unknown user / keyword use the unknown id and say so.

        A live photo beyond the built catalogue is cold: scored as the model's unknown photo
        (the ids reserved for a photo, photographer and stats it did not see in training).
        """
        assert self.encoder is not None, "the ranker is not fitted"
        candidates = as_candidates(query.candidates)
        valid = known_photo_mask(candidates, self.encoder.n_photos)
        valid = valid | query.cold(valid)
        context, unknown = self.encoder.encode_context(query.user_idx, query.keyword, query.country)
        reason = _unknown_reason(unknown)
        if len(candidates) == 0:
            return RankScores(np.zeros(0, dtype=np.float32), fallback_reason=reason)
        rows = torch.from_numpy(self.encoder.photo_rows(candidates))
        with torch.inference_mode():
            scores = self.scoring_model()(
                torch.from_numpy(context).unsqueeze(0), rows.unsqueeze(0)
            )[0].numpy()
        scores = self.blend_prior(scores, candidates, query.keyword, valid)
        return RankScores(finalize_scores(scores, valid), fallback_reason=reason)

    def score_batch(self, queries: list[RankQuery], chunk: int = 256) -> list[RankScores]:
        """Score many queries with one forward pass per ``chunk`` (validation, evaluation).

        Gives the same scores as :meth:`score` one query at a time, up to float rounding.
        """
        assert self.encoder is not None, "the ranker is not fitted"
        results: list[RankScores] = []
        model = self.scoring_model()
        # The photo side depends on the photo alone: once per photo when that is less work.
        every_photo = None
        if sum(len(q.candidates) for q in queries) > self.encoder.n_photos:
            with torch.inference_mode():
                every_photo = model.photo_side(torch.arange(len(model.photo_fields))[None])
        for start in range(0, len(queries), chunk):
            part = queries[start : start + chunk]
            candidates = [as_candidates(q.candidates) for q in part]
            width = max(1, max(len(c) for c in candidates))
            rows = np.zeros((len(part), width), dtype=np.int64)
            context = np.empty((len(part), 3), dtype=np.int64)
            reasons = []
            for i, (q, c) in enumerate(zip(part, candidates)):
                context[i], unknown = self.encoder.encode_context(q.user_idx, q.keyword, q.country)
                rows[i, : len(c)] = self.encoder.photo_rows(c)
                reasons.append(_unknown_reason(unknown))
            rows_tensor = torch.from_numpy(rows)
            with torch.inference_mode():
                side = None
                if every_photo is not None:
                    side = (every_photo[0][0, rows_tensor], every_photo[1][0, rows_tensor])
                scores = model(torch.from_numpy(context), rows_tensor, side).numpy()
            for i, (q, c) in enumerate(zip(part, candidates)):
                valid = known_photo_mask(c, self.encoder.n_photos)
                blended = self.blend_prior(scores[i, : len(c)], c, q.keyword, valid)
                results.append(RankScores(finalize_scores(blended, valid), reasons[i]))
        return results

    def extra_config(self) -> dict:
        """Model-specific entries of ``config.json`` (none for FM)."""
        return {}

    def save(self, directory: Path) -> None:
        """Write ``config.json``, ``encoder.npz`` and the FP32 ``state_dict`` as ``model.pt``."""
        assert self.model is not None and self.encoder is not None, "the ranker is not fitted"
        directory = Path(directory)
        write_config(
            directory,
            self.name,
            {
                "params": self.params,
                "encoder": self.encoder.to_config(),
                "best_epoch": self.best_epoch,
                "history": self.history,
                **self.extra_config(),
            },
        )
        save_arrays(directory / ENCODER_FILE, **self.encoder.to_arrays())
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        self.save_prior(directory)

    @classmethod
    def load(cls, directory: Path, catalogue: Catalogue) -> FMRanker:
        """Read a ranker written by :meth:`save` (``torch.load(..., weights_only=True)``)."""
        directory = Path(directory)
        config = read_config(directory, cls.name)
        # Sets saved before FM had the query prior were validated without it.
        ranker = cls(**{"popularity_weight": 0.0, **config["params"]})
        ranker.load_prior(directory, catalogue)
        ranker.encoder = FieldEncoder.from_saved(
            load_arrays(directory / ENCODER_FILE), config["encoder"]
        )
        ranker.model = ranker.build_model(ranker.encoder)
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
        ranker.model.load_state_dict(state)
        ranker.model.eval()
        ranker.best_epoch = int(config.get("best_epoch", 0))
        ranker.history = list(config.get("history", []))
        ranker.apply_extra_config(config)
        return ranker

    def apply_extra_config(self, config: dict) -> None:
        """Apply model-specific entries of a loaded ``config.json`` (none for FM)."""


def _unknown_reason(unknown_fields: list[str]) -> str:
    """The fallback reason for unknown context fields ("" when all are known)."""
    if not unknown_fields:
        return ""
    return f"unknown {' and '.join(unknown_fields)}: scored with the other fields"


def _format_entry(entry: dict) -> str:
    parts = [f"loss {entry['loss']:.4f}"]
    if "validation_ndcg" in entry:
        parts.append(f"validation NDCG@10 {entry['validation_ndcg']:.4f}")
    return ", ".join(parts)
