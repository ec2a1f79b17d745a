"""Matryoshka-Adaptor (Yoon et al., EMNLP 2024, arXiv 2407.20243): a small residual MLP on frozen
embeddings, ``a = x + f(x)``, trained so that the prefixes ``a[:, :m]`` keep the similarity structure of
the full original embedding ``x``.

``f`` is ``Linear -> ReLU -> Linear`` with its last layer initialised to zero, so the adaptor starts as
the identity (the frozen model's own embedding) and moves away from it only as far as the losses ask.
Similarities are cosines; ``cos_m(i, j)`` is the cosine of the adapted prefixes of size ``m`` of rows
``i`` and ``j`` of the batch, ``cos(i, j)`` that of the original full embeddings. Losses of one size
``m`` (the paper sums over pairs; means are used here so that the weights do not depend on the batch
size):

- pairwise (``L_pair``): the mean over all pairs ``i != j`` of ``|cos(i, j) - cos_m(i, j)|``;
- top-k (``L_topk``): the same over each row's ``neighbours`` nearest rows by ``cos``: local structure;
- reconstruction (``L_rec``): ``mean |x - a|``, which keeps the adapted embedding near the original; it
  does not depend on the size, so each of the ``G`` sizes carries ``1 / G`` of it (with unit size weights
  the objective is the paper's);
- ranking (supervised, ``L_rank``), the paper's form (from Search-Adaptor) with graded relevance
  ``y_ij``: the mean over triples with ``y_ij > y_ik`` of ``(y_ij - y_ik) * log(1 + exp(s_ik - s_ij))``,
  ``s`` the cosines of the adapted prefixes of size ``m``. Here each row is a query and the batch's other
  rows its corpus, relevant where they share its class (``y = 1``), else ``y = 0``.

Unsupervised: ``L_m = topk_weight * L_topk + pair_weight * L_pair + reconstruction_weight * L_rec / G``;
supervised adds ``ranking_weight * L_rank``. The paper tunes these weights (its alpha, beta, gamma) per
data set.

Protocol for a Matryoshka objective: :meth:`MatryoshkaAdaptor.per_size` returns one loss per size of
``nesting``, shape ``(G,)``, which the objective weighs (``sum_g c_g * loss_g``, with any per-step size
mask) as it weighs cross-entropy per prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl.errors import MRLError
from mrl.nn.matryoshka_contrastive import prefix_cosines
from mrl.nn.nesting import validate_nesting


def similarity_weights(
    original: torch.Tensor, neighbours: int, pair_weight: float, topk_weight: float
) -> torch.Tensor:
    """The weight of each pair's ``|cos(i, j) - cos_m(i, j)|`` in ``pair_weight * L_pair + topk_weight *
    L_topk``, ``(B, B)`` from the original cosines ``(B, B)``: ``L_pair`` is the mean over the pairs
    ``i != j``, ``L_topk`` the mean over each row's ``neighbours`` nearest other rows by ``cos`` (fewer
    where the batch has fewer other rows, none for a batch of one row).

    Why one weight matrix: both losses then cost one weighted sum of one ``(B, B)`` difference per size,
    and their backward no gather or mask of it (each would fill a ``(B, B)`` zero matrix per size).
    """
    n = original.shape[0]
    self_pairs = torch.eye(n, dtype=torch.bool, device=original.device)
    weights = original.new_full((n, n), pair_weight / max(n * (n - 1), 1)).masked_fill_(self_pairs, 0.0)
    count = min(int(neighbours), n - 1)
    if count >= 1 and topk_weight:
        nearest = original.masked_fill(self_pairs, float("-inf")).topk(count, dim=1).indices
        weights.scatter_add_(1, nearest, weights.new_full(nearest.shape, topk_weight / (n * count)))
    return weights


def ranking_loss(scores: torch.Tensor, relevance: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``L_rank`` of one size: ``scores`` ``(Q, N)`` adapted similarities of queries to corpus items,
    ``relevance`` ``(Q, N)`` graded relevance, ``candidates`` ``(Q, N)`` which items each query ranks.
    The mean over ranked triples (``y_ij > y_ik``) of ``(y_ij - y_ik) * softplus(s_ik - s_ij)``; 0 for a
    batch with no such triple."""
    gap = relevance[:, :, None] - relevance[:, None, :]  # (Q, j, k): y_ij - y_ik
    pair = candidates[:, :, None] & candidates[:, None, :] & (gap > 0)
    weight = torch.where(pair, gap, 0.0).to(scores.dtype)
    count = pair.sum().clamp_min(1).to(scores.dtype)
    return (weight * nn.functional.softplus(scores[:, None, :] - scores[:, :, None])).sum() / count


def reconstruction_loss(original: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """``L_rec``: the mean absolute difference between the adapted and the original embeddings."""
    return (adapted - original).abs().mean()


class MatryoshkaAdaptor(nn.Module):
    """``x + f(x)`` on frozen embeddings of ``in_features`` features, trained at the prefix sizes
    ``nesting`` (see the module docstring). ``hidden_features`` is ``f``'s width (default: the input's);
    ``supervised`` adds the ranking loss, which needs class labels as the target."""

    def __init__(
        self,
        in_features: int,
        nesting: Sequence[int],
        hidden_features: int | None = None,
        neighbours: int = 10,
        topk_weight: float = 1.0,
        pair_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        ranking_weight: float = 1.0,
        supervised: bool = False,
    ) -> None:
        super().__init__()
        self.nesting = validate_nesting(nesting)
        if self.nesting[-1] > in_features:
            raise MRLError(
                f"The Matryoshka-Adaptor's sizes go up to {self.nesting[-1]} but the frozen embedding has "
                f"{in_features} features, and the adaptor keeps that width: use sizes of at most "
                f"{in_features}."
            )
        hidden = int(in_features if hidden_features is None else hidden_features)
        if hidden < 1 or neighbours < 1:
            raise MRLError(
                f"The Matryoshka-Adaptor needs a hidden width and a neighbour count of at least 1, got "
                f"hidden_features={hidden_features} and neighbours={neighbours}."
            )
        self.residual = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, in_features)
        )
        # the last layer starts at zero: the adaptor starts as the identity on the frozen embedding
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)
        self.neighbours = int(neighbours)
        self.topk_weight, self.pair_weight = float(topk_weight), float(pair_weight)
        self.reconstruction_weight, self.ranking_weight = float(reconstruction_weight), float(ranking_weight)
        self.supervised = bool(supervised)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted embedding ``x + f(x)``, shape ``(B, in_features)``."""
        return x + self.residual(x)

    def embed(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The size-``dim`` prefix of the adapted embedding."""
        return self(x)[:, :dim]

    def per_size(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of every size of ``nesting`` ``(G,)`` on frozen ``features`` ``(B, in_features)``;
        ``target``: class labels ``(B,)``, read by the supervised ranking loss only."""
        if self.supervised and target is None:
            raise ValueError("the supervised Matryoshka-Adaptor needs the batch's labels as target")
        adapted = self(features)
        original = next(prefix_cosines(features, [features.shape[1]]))
        weights = similarity_weights(original, self.neighbours, self.pair_weight, self.topk_weight).flatten()
        rec = self.reconstruction_weight * reconstruction_loss(features, adapted) / len(self.nesting)
        if self.supervised:
            others = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
            relevance = (target[:, None] == target[None, :]).to(features.dtype)
        # size by size: each (B, B) matrix of cosines is used while it is in cache, and no (G, B, B)
        # stack is written and read back
        losses = []
        for adapted_cos in prefix_cosines(adapted, self.nesting):
            loss = (adapted_cos - original).abs().flatten() @ weights + rec
            if self.supervised:
                loss = loss + self.ranking_weight * ranking_loss(adapted_cos, relevance, others)
            losses.append(loss)
        return torch.stack(losses)
