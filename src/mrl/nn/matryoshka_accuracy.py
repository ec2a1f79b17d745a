"""Top-k accuracy of every size of a Matryoshka head as one torchmetrics metric."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class MatryoshkaAccuracy(Metric):
    """Micro top-``k`` accuracy of each of ``num_sizes`` sizes: ``compute()`` returns ``(G,)`` (a scalar
    when ``G`` is 1: torchmetrics squeezes one-element results).

    Equal to one ``MulticlassAccuracy(top_k=k, average="micro")`` per size (tests compare them), but
    one update per step counts the hits of all sizes with one vectorised comparison. Why not one
    torchmetrics object per size: each update call is tens of microseconds of Python, paid G times per
    step (2G in evaluation: top-1 and top-5); ``benchmarks/platform_overhead.py`` prints both costs per
    step for the default job's nine sizes. The states are summed across processes by torchmetrics (DDP).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_sizes: int, top_k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_sizes < 1 or top_k < 1:
            raise ValueError(
                f"MatryoshkaAccuracy needs num_sizes >= 1 and top_k >= 1, got {num_sizes}, {top_k}"
            )
        self.top_k = top_k
        self.add_state("correct", default=torch.zeros(num_sizes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """``scores``: per-size logits ``(G, B, C)``, or per-size predicted classes ``(G, B)`` (top-1
        only); ``target``: ``(B,)`` class indices."""
        if scores.ndim == 2:
            if self.top_k != 1:
                raise ValueError(f"top-{self.top_k} accuracy needs logits (G, B, C), got classes (G, B)")
            hits = scores == target
        elif self.top_k == 1:
            hits = scores.argmax(-1) == target  # argmax, as MulticlassAccuracy's top-1 (ties: first class)
        else:
            hits = (scores.topk(self.top_k, -1).indices == target.unsqueeze(-1)).any(-1)
        self.correct += hits.sum(-1)
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        # An empty epoch gives 0, as torchmetrics' accuracies do (not nan).
        return self.correct.float() / self.total.clamp(min=1)
