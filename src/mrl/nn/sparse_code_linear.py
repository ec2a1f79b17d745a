"""Linear classifiers on sparse codes: the Matryoshka head of a CSR model (``head=csr``).

A CSR model's embedding ``z`` is the non-negative code of its largest ``k`` (``(B, hidden)``, at most
``k_max`` non-zeros per row); its size-``k`` representation is not a prefix but the code of the ``k``
largest units, :func:`size_view`. Top-k sets are nested, so the ``k`` largest units of the ``k_max``
code are the size-``k`` code itself (:meth:`mrl.nn.sparse_autoencoder.SparseAutoencoder.encode`).

:class:`SparseCodeLinear` has :class:`~mrl.nn.matryoshka_linear.MatryoshkaLinear`'s interface
(``nesting``, ``num_classes``, ``size_weight``, ``size_bias``, ``forward(z) -> (G, B, C)``), so the
cross-entropy, the per-size accuracies and ``mrl-eval``'s linear and adaptive-classification
evaluators use it unchanged: one untied classifier over all ``hidden`` units per ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrl.nn.nesting import validate_nesting
from mrl.nn.sparse_autoencoder import top_k_code


def size_view(z: torch.Tensor, size: int, sparse: bool) -> torch.Tensor:
    """The size-``size`` representation of embeddings ``z`` ``(B, D)``: the prefix ``z[:, :size]``, or
    for sparse codes the code of the ``size`` largest units ``(B, D)`` (zeros elsewhere)."""
    return top_k_code(z, size) if sparse else z[:, :size]


class SparseCodeLinear(nn.Module):
    """One linear classifier per ``k`` in ``nesting`` on the size-``k`` code of ``hidden``-unit codes.

    ``weight`` holds the classifiers side by side, ``(num_classes, G * hidden)``; ``forward(z)`` of codes
    ``(B, hidden)`` returns logits ``(G, B, C)``, size ``g`` reading only the ``nesting[g]`` largest
    units of each row.
    """

    efficient = False  # untied, like head=mrl
    fused = False  # the one-node head and cross-entropy are for prefixes: this head runs head then loss

    def __init__(self, hidden: int, num_classes: int, nesting: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.nesting = validate_nesting(nesting, hidden)
        self.in_features = int(hidden)
        self.num_classes = int(num_classes)
        g = len(self.nesting)
        self.weight = nn.Parameter(torch.empty(num_classes, g * self.in_features))
        self.bias = nn.Parameter(torch.empty(g, num_classes)) if bias else None
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default for a fan-in of hidden
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def size_weight(self, index: int) -> torch.Tensor:
        """The ``(num_classes, hidden)`` classifier of the ``index``-th ``k`` (a view)."""
        start = index * self.in_features
        return self.weight[:, start : start + self.in_features]

    def size_bias(self, index: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[index]

    def size_logits(self, z: torch.Tensor, index: int) -> torch.Tensor:
        """Logits ``(B, C)`` of the ``index``-th classifier, on the size-``nesting[index]`` code of
        ``z`` ``(B, hidden)``."""
        self._check_codes(z)
        code = size_view(z, self.nesting[index], sparse=True)
        return F.linear(code, self.size_weight(index), self.size_bias(index))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # one sorted top-k of the largest k gives every smaller code as its prefix (top-k sets are
        # nested): a top-k per size cost more than the classifiers themselves
        self._check_codes(z)
        values, indices = z.topk(self.nesting[-1], dim=1)
        values = F.relu(values)
        logits = []
        for g, k in enumerate(self.nesting):
            code = torch.zeros_like(z).scatter(1, indices[:, :k], values[:, :k])
            logits.append(F.linear(code, self.size_weight(g), self.size_bias(g)))
        return torch.stack(logits)

    def _check_codes(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(
                f"SparseCodeLinear expects codes of shape (B, {self.in_features}), got {tuple(z.shape)}"
            )

    def extra_repr(self) -> str:
        return f"hidden={self.in_features}, num_classes={self.num_classes}, k={self.nesting}"
