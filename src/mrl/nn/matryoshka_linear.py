"""The Matryoshka classification head: one set of logits per embedding prefix size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrl.nn.fused import fused_matryoshka_linear
from mrl.nn.nesting import validate_nesting


class MatryoshkaLinear(nn.Module):
    """Linear classifiers on the prefixes ``z[:, :m]`` of an embedding, for every ``m`` in ``nesting``.

    * ``efficient=False`` (MRL): an independent classifier ``W_m`` (``num_classes x m``) and bias per
      size. The weights are stored side by side in one matrix ``weight`` of shape
      ``(num_classes, sum(nesting))``; :meth:`size_weight` returns the block of one size.
    * ``efficient=True`` (MRL-E): one matrix ``weight`` (``num_classes x max(nesting)``) and one bias;
      size ``m`` uses the first ``m`` columns (weight tying, as in the paper's code).

    ``forward(z)`` with ``z`` of shape ``(B, in_features)`` returns logits ``(G, B, C)``, ``G =
    len(nesting)``, in nesting order. Logits of size ``m`` never depend on ``z[:, m:]``.

    ``fused=True`` (the default) computes all sizes in one autograd node that writes every size's
    logits and gradients straight into preallocated buffers (no stacking, no full-size zero gradient per
    slice). MRL-E is one pass: the embedding is cut into chunks at the nesting boundaries, each chunk is
    multiplied by its block of columns once and accumulated onto the previous size's logits (prefix
    sums), so it costs one full-size matmul instead of ``sum(nesting)`` columns' worth (about half for
    powers of two). ``fused=False`` keeps the paper's per-size formulation for comparison; both give the
    same numbers (tests check values and gradients in float64). For training,
    :meth:`MatryoshkaLoss.per_size_from_embedding` runs this head and the cross-entropy as one node.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        nesting: Sequence[int],
        efficient: bool = False,
        bias: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.nesting = validate_nesting(nesting, in_features)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.efficient = bool(efficient)
        self.fused = bool(fused)
        if self.efficient:
            self.weight = nn.Parameter(torch.empty(num_classes, self.nesting[-1]))
            self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        else:
            self.weight = nn.Parameter(torch.empty(num_classes, sum(self.nesting)))
            self.bias = nn.Parameter(torch.empty(len(self.nesting), num_classes)) if bias else None
        # Column offset of each size's block inside an untied ``weight``.
        offsets = [0]
        for m in self.nesting[:-1]:
            offsets.append(offsets[-1] + m)
        self._offsets = offsets
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation, applied to each classifier with its own fan-in."""
        if self.efficient:
            bound = 1.0 / math.sqrt(self.nesting[-1])
            nn.init.uniform_(self.weight, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
            return
        with torch.no_grad():
            for g, m in enumerate(self.nesting):
                bound = 1.0 / math.sqrt(m)
                self.size_weight(g).uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[g].uniform_(-bound, bound)

    def size_weight(self, index: int) -> torch.Tensor:
        """The ``(num_classes, m)`` weight used by the ``index``-th size (a view, gradients flow)."""
        m = self.nesting[index]
        if self.efficient:
            return self.weight[:, :m]
        start = self._offsets[index]
        return self.weight[:, start : start + m]

    def size_bias(self, index: int) -> torch.Tensor | None:
        """The bias used by the ``index``-th size (shared by all sizes for MRL-E)."""
        if self.bias is None:
            return None
        return self.bias if self.efficient else self.bias[index]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(
                f"MatryoshkaLinear expects embeddings of shape (B, {self.in_features}), got {tuple(z.shape)}"
            )
        if not self.fused:
            return self.forward_reference(z)
        return fused_matryoshka_linear(z, self.weight, self.bias, self.nesting, self.efficient)

    def forward_reference(self, z: torch.Tensor) -> torch.Tensor:
        """The paper's formulation: one matmul per size on ``z[:, :m]``."""
        return torch.stack(
            [F.linear(z[:, :m], self.size_weight(g), self.size_bias(g)) for g, m in enumerate(self.nesting)]
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, nesting={self.nesting}, "
            f"efficient={self.efficient}, bias={self.bias is not None}, fused={self.fused}"
        )
