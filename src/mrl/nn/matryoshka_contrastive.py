"""Matryoshka contrastive losses: supervised-contrastive (SupCon) and InfoNCE (SimCLR's NT-Xent) on every
prefix ``z[:, :m]`` of an embedding of several augmented views, each prefix L2-normalised after truncation.

For views ``z`` of shape ``(V * B, D)`` (view-major: rows ``v * B + i`` are the views of image ``i``) and a
size ``m``, the cosine similarities of the normalised prefixes divided by the temperature are the logits;
each row is an anchor, every other row a candidate (the anchor itself is left out), and the loss of an
anchor is minus the mean log-probability of its positives:

- ``infonce``: the positives are the other views of the same image (with two views: SimCLR's NT-Xent);
- ``supcon``: every other row of the same class (Khosla et al. 2020, the ``L_out`` form).

The loss of a size is the mean over anchors. :class:`MatryoshkaContrastiveLoss` is a per-size loss for
:class:`mrl.nn.matryoshka_loss.MatryoshkaLoss`, which weighs the sizes as ``sum_m c_m * loss_m``
(``head.weights``, and the size sampler's draw), the one place that weighs per-size losses, whatever the
objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

KINDS = ("supcon", "infonce")


def prefix_cosine_similarities(z: torch.Tensor, nesting: Sequence[int], eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarities of the L2-normalised prefixes ``z[:, :m]`` for every ``m`` in ``nesting``,
    shape ``(G, N, N)``.

    Computed in one pass over the features: the dot products of the feature blocks between consecutive
    sizes, summed cumulatively, are the prefixes' dot products (one ``N x N x D`` matmul in all, not one per
    size), and the prefixes' squared norms are cumulative sums of squares.
    """
    bounds = [0, *(int(m) for m in nesting)]
    blocks = torch.stack([z[:, lo:hi] @ z[:, lo:hi].T for lo, hi in pairwise(bounds)])
    dots = blocks.cumsum(0)  # (G, N, N): z_i[:m] . z_j[:m]
    index = torch.as_tensor(bounds[1:], device=z.device) - 1
    # clamped before the square root, whose gradient at 0 is infinite (all-zero prefixes, e.g. of ReLU
    # features, would make every gradient NaN); the same values as F.normalize's eps otherwise
    norms = z.square().cumsum(1)[:, index].T.clamp_min(eps * eps).sqrt()  # (G, N)
    return dots / (norms[:, :, None] * norms[:, None, :])


def matryoshka_contrastive_per_size(
    z: torch.Tensor,
    nesting: Sequence[int],
    views: int,
    labels: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """The contrastive loss of every size, shape ``(G,)``, for view-major views ``z`` ``(views * B, D)``.

    With ``labels`` ``(B,)`` the positives are the same class (SupCon); without, the other views of the
    same image (InfoNCE). With at least two views every anchor has positives (its image's other views).
    """
    n = z.shape[0]
    if views < 2 or n % views:
        raise ValueError(f"contrastive losses need >= 2 views of each image; got {n} rows for {views} views")
    batch = n // views
    image = torch.arange(batch, device=z.device).repeat(views)
    keys = image if labels is None else labels.to(z.device).repeat(views)
    self_pairs = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (keys[:, None] == keys[None, :]) & ~self_pairs
    logits = prefix_cosine_similarities(z, nesting) / temperature  # (G, N, N)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=2, keepdim=True)
    # masked_fill, not multiply: the anchor's own -inf log-probability times 0 would be nan. No boolean
    # indexing: its result's size would have to be read back from the GPU every step.
    summed = log_prob.masked_fill(~positives, 0.0).sum(2)  # (G, N)
    return (-summed / positives.sum(1).to(z.dtype)).mean(1)


class MatryoshkaContrastiveLoss(nn.Module):
    """The ``kind`` contrastive loss ``L_m`` of the normalised prefixes of every size ``m`` (see the module
    docstring), to be weighed by a ``MatryoshkaLoss(per_size_loss=...)``.

    Holds no state, so a contrastive run's checkpoint has the same keys as a cross-entropy run's.
    """

    def __init__(
        self,
        nesting: Sequence[int],
        kind: str = "supcon",
        temperature: float = 0.1,
        views: int = 2,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown contrastive loss {kind!r}; one of {KINDS}")
        self.nesting = [int(m) for m in nesting]
        self.kind = kind
        self.temperature = float(temperature)
        self.views = int(views)

    def check_views(self, x: torch.Tensor) -> None:
        """Refuse a training batch that is not ``views`` stacked views of its images ``(V, B, C, H, W)``."""
        if x.dim() != 5 or x.shape[0] != self.views:
            raise RuntimeError(
                f"objective={self.kind} needs {self.views} views per training batch (V, B, C, H, W), got a "
                f"batch of shape {tuple(x.shape)}: the datamodule was not given objective.views "
                "(datamodule.configure_views)"
            )

    def per_size(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of every size ``(G,)`` for view-major views ``z`` and labels ``(B,)``."""
        return matryoshka_contrastive_per_size(
            z,
            self.nesting,
            self.views,
            labels=labels if self.kind == "supcon" else None,
            temperature=self.temperature,
        )

    forward = per_size  # calling the loss gives the per-size losses too
