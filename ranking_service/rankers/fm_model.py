"""The Factorization Machine network FM and DeepFM score with (Rendle 2010), in PyTorch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ranking_service.rankers.features import FieldEncoder


class FactorizationMachine(nn.Module):
    """Bias + linear terms + pairwise interactions of all field embeddings (Rendle 2010).

    The query's context fields are shared by its candidates, so inputs are ``context`` ``(B, 3)``
    global ids and ``photo_rows`` ``(B, C)`` (photo index + 1, 0 for unknown), and the output is
    ``(B, C)`` scores. The photo side (fields, tag bags) is looked up in buffers built from the
    :class:`FieldEncoder`; the tag field's vector is the confidence-weighted mean of the photo's
    tag embeddings. With the encoder's dense CLIP field, a linear map of the photo's reduced
    image embedding is one more field vector (and a linear term), so photos that look alike
    share what is learnt about them.

    Parameters
    ----------
    encoder:
        Gives the number of ids and the photo-side lookup tables.
    factors:
        Embedding size.
    init_std:
        Standard deviation of the initial embeddings.
    """

    def __init__(self, encoder: FieldEncoder, factors: int, init_std: float = 0.05) -> None:
        super().__init__()
        self.n_fields = encoder.n_fields
        self.embedding = nn.Embedding(encoder.n_features, factors)
        self.linear = nn.Embedding(encoder.n_features, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=init_std)
        nn.init.zeros_(self.linear.weight)
        # Catalogue lookups, rebuilt from the encoder on load: not part of the state_dict.
        self.register_buffer("photo_fields", torch.from_numpy(encoder.photo_fields), False)
        weights = encoder.photo_tag_weights
        share = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-6)
        self.register_buffer("tag_ids", torch.from_numpy(encoder.photo_tag_ids), False)
        self.register_buffer("tag_share", torch.from_numpy(share.astype(np.float32)), False)
        self.has_tags = encoder.has_tags
        self.dense_dims = encoder.dense_dims
        if self.dense_dims:
            self.n_fields += 1
            self.register_buffer("photo_dense", torch.from_numpy(encoder.photo_dense), False)
            self.dense = nn.Linear(self.dense_dims, factors, bias=False)
            self.dense_linear = nn.Linear(self.dense_dims, 1, bias=False)
            nn.init.normal_(self.dense.weight, std=init_std)
            nn.init.zeros_(self.dense_linear.weight)

    def photo_side(self, photo_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the candidates' field embeddings ``(B, C, F, k)`` and linear terms ``(B, C)``."""
        fields = self.photo_fields[photo_rows]
        embedded = self.embedding(fields)
        linear = self.linear(fields).sum((2, 3))
        if self.has_tags:
            tags, share = self.tag_ids[photo_rows], self.tag_share[photo_rows].unsqueeze(-1)
            bag = (self.embedding(tags) * share).sum(2, keepdim=True)
            embedded = torch.cat([embedded, bag], dim=2)
            linear = linear + (self.linear(tags) * share).sum((2, 3))
        if self.dense_dims:
            dense = self.photo_dense[photo_rows]
            embedded = torch.cat([embedded, self.dense(dense).unsqueeze(2)], dim=2)
            linear = linear + self.dense_linear(dense).squeeze(-1)
        return embedded, linear

    def fm_scores(
        self,
        context: torch.Tensor,
        context_emb: torch.Tensor,
        photo_emb: torch.Tensor,
        photo_linear: torch.Tensor,
    ) -> torch.Tensor:
        """Return the FM part: ``bias + Σ w_i + ½ Σ_f [(Σ_i v_if)² − Σ_i v_if²]`` (O(kn))."""
        total = context_emb.sum(1, keepdim=True) + photo_emb.sum(2)
        squares = context_emb.pow(2).sum(1, keepdim=True) + photo_emb.pow(2).sum(2)
        pairwise = 0.5 * (total.pow(2) - squares).sum(-1)
        linear = self.linear(context).sum((1, 2)).unsqueeze(1) + photo_linear
        return self.bias + linear + pairwise

    def score_with_embeddings(
        self, context: torch.Tensor, photo_rows: torch.Tensor, photo_side=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores (B, C), context and photo embeddings)``; ``photo_side``: precomputed."""
        context_emb = self.embedding(context)
        photo_emb, photo_linear = photo_side or self.photo_side(photo_rows)
        scores = self.fm_scores(context, context_emb, photo_emb, photo_linear)
        return scores, context_emb, photo_emb

    def forward(self, context: torch.Tensor, photo_rows: torch.Tensor, photo_side=None):
        """Return ``(B, C)`` scores."""
        return self.score_with_embeddings(context, photo_rows, photo_side)[0]
