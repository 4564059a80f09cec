"""The ``deepfm`` ranker: the FM part plus an MLP over the concatenated field embeddings."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers.features import FieldEncoder
from ranking_service.rankers.fm import FMRanker
from ranking_service.rankers.fm_model import FactorizationMachine
from ranking_service.rankers.validation import ValidationSet


class DeepFM(FactorizationMachine):
    """DeepFM (Guo et al. 2017): FM and an MLP sharing the same field embeddings.

    Parameters
    ----------
    encoder:
        Gives the number of ids and the photo-side lookup tables.
    factors:
        Embedding size.
    hidden:
        Widths of the MLP's hidden layers (ReLU); the MLP ends in one output.
    init_std:
        Standard deviation of the initial embeddings.
    dropout:
        Dropout after each hidden layer while training.
    """

    def __init__(
        self,
        encoder: FieldEncoder,
        factors: int,
        hidden: tuple[int, ...],
        init_std: float = 0.05,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(encoder, factors, init_std)
        layers: list[nn.Module] = []
        width = self.n_fields * factors
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def score_with_embeddings(
        self, context: torch.Tensor, photo_rows: torch.Tensor, photo_side=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(FM + MLP scores (B, C), context embeddings, photo embeddings)``.

        ``photo_side`` is :meth:`photo_side` of ``photo_rows`` when the caller has it already.
        """
        context_emb = self.embedding(context)
        photo_emb, photo_linear = photo_side or self.photo_side(photo_rows)
        fm = self.fm_scores(context, context_emb, photo_emb, photo_linear)
        batch, n_candidates = photo_rows.shape
        shared = context_emb.unsqueeze(1).expand(batch, n_candidates, -1, -1)
        deep = torch.cat([shared, photo_emb], dim=2).flatten(2)
        return fm + self.mlp(deep).squeeze(-1), context_emb, photo_emb


class DeepFMRanker(FMRanker):
    """DeepFM ranker: :class:`FMRanker`'s fields, BPR training and fallbacks, plus an MLP.

    Parameters
    ----------
    hidden:
        Widths of the MLP's hidden layers.
    dropout:
        Dropout after each hidden layer while training.
    mlp_weight_decay:
        L2 weight decay of the MLP's weights (the embeddings get FM's ``l2``).
    int8:
        Serve with the MLP's ``nn.Linear`` layers dynamically quantized to INT8 (see
        :mod:`ranking_service.rankers.int8`; the gate there decides whether to).
    **params:
        :class:`FMRanker`'s parameters.
    """

    name = "deepfm"

    def __init__(
        self,
        hidden: tuple[int, ...] | list[int] = (32,),
        dropout: float = 0.5,
        mlp_weight_decay: float = 1e-3,
        int8: bool = False,
        **params,
    ):
        super().__init__(**params)
        self.hidden = tuple(int(size) for size in hidden)
        self.dropout = float(dropout)
        self.mlp_weight_decay = float(mlp_weight_decay)
        self.int8 = False
        self._int8_model: nn.Module | None = None
        self._want_int8 = bool(int8)

    @property
    def params(self) -> dict:
        """The constructor parameters (``int8`` is saved apart, as the gate's outcome)."""
        return {
            **super().params,
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "mlp_weight_decay": self.mlp_weight_decay,
        }

    def build_model(self, encoder: FieldEncoder) -> DeepFM:
        """Return a freshly initialised DeepFM for ``encoder``'s fields."""
        return DeepFM(encoder, self.factors, self.hidden, self.init_std, self.dropout)

    def parameter_groups(self) -> list[dict]:
        """Embeddings as in FM; the MLP with weight decay (it overfits ID embeddings fast)."""
        mlp = list(self.model.mlp.parameters())
        mlp_ids = {id(p) for p in mlp}
        rest = [p for p in self.model.parameters() if id(p) not in mlp_ids]
        return [{"params": rest}, {"params": mlp, "weight_decay": self.mlp_weight_decay}]

    def fit(
        self,
        catalogue: Catalogue,
        show_progress: bool = True,
        candidates: CandidateLists | None = None,
        embeddings: ImageEmbeddings | None = None,
        validation: ValidationSet | None = None,
    ) -> DeepFMRanker:
        """Train as :meth:`FMRanker.fit`; quantize afterwards when built with ``int8=True``."""
        self.set_int8(False)
        self._int8_model = None
        super().fit(catalogue, show_progress, candidates, embeddings, validation)
        self.set_int8(self._want_int8)
        return self

    def set_int8(self, enabled: bool) -> None:
        """Serve with the INT8 MLP or with FP32 (the INT8 copy is made once per trained model)."""
        self.int8 = bool(enabled) and self.model is not None
        if self.int8 and self._int8_model is None:
            self._int8_model = quantize_int8(self.model)

    def scoring_model(self) -> nn.Module:
        """Return the INT8 network when enabled, else the FP32 one."""
        if self.int8 and self._int8_model is not None:
            return self._int8_model
        return super().scoring_model()

    def extra_config(self) -> dict:
        """Record whether the saved model serves as INT8 (the weights are saved as FP32)."""
        return {"int8": self.int8}

    def apply_extra_config(self, config: dict) -> None:
        """Re-quantize on load when the saved ranker served as INT8."""
        self.set_int8(bool(config.get("int8", False)))


def quantize_int8(model: DeepFM) -> DeepFM:
    """Return a copy of ``model`` whose MLP ``nn.Linear`` layers are dynamically INT8.

    Embeddings and the FM part stay FP32: only the MLP's matrix products are quantized.

    Parameters
    ----------
    model:
        A trained DeepFM (left unchanged).

    Returns
    -------
    DeepFM
        The quantized copy, in eval mode.
    """
    names = {
        f"mlp.{name}" for name, module in model.mlp.named_modules() if isinstance(module, nn.Linear)
    }
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, still present and, for
        # dynamic Linear on this CPU, several times faster (see FIGURES.md).
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), names, dtype=torch.qint8
        )
