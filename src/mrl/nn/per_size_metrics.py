"""Per-size epoch metrics of a Matryoshka head: the mean loss of every size as one torchmetrics metric,
and the bundle of a head's accuracies and loss mean on one split, logged as ``{prefix}/{name}@{d}``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import Metric

from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy


class MatryoshkaLossMean(Metric):
    """The mean per-size loss ``(G,)`` over the batches of an epoch, each batch weighed by its size.

    The states are the sum of ``per_size * batch_size`` and the count of examples, both summed across
    processes by torchmetrics, so under DDP :meth:`compute` is the exact mean over every process's
    examples (not a mean of the processes' means).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_sizes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum", default=torch.zeros(num_sizes), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, per_size: torch.Tensor, batch_size: int) -> None:
        """``per_size``: a batch's mean loss of every size ``(G,)``; ``batch_size``: its example count."""
        self.sum += per_size.detach() * batch_size
        self.count += batch_size

    def compute(self) -> torch.Tensor:
        # Divided by the count as a Python number, once per epoch: the arithmetic of a host-side count
        # (on CUDA a division by a host scalar is a multiplication by its reciprocal).
        return self.sum / int(self.count)


class PerSizeMetrics(nn.Module):
    """A head's per-size metrics on one split over an epoch: the top-``k`` accuracy for each ``k`` in
    ``top_k`` (named ``acc`` for top-1, ``top{k}`` otherwise) and the mean loss (named ``loss_name``).

    Accumulated on the device at every :meth:`update` and computed once per epoch: one ``self.log`` call
    per size per step would cost more than a small model's step.
    """

    def __init__(self, nesting: Sequence[int], top_k: Sequence[int] = (1,), loss_name: str = "loss") -> None:
        super().__init__()
        self.nesting = list(nesting)
        self.accuracies = nn.ModuleDict(
            {("acc" if k == 1 else f"top{k}"): MatryoshkaAccuracy(len(self.nesting), top_k=k) for k in top_k}
        )
        self.loss = MatryoshkaLossMean(len(self.nesting))
        self.loss_name = loss_name

    def update(
        self, per_size: torch.Tensor, target: torch.Tensor, scores: torch.Tensor | None = None
    ) -> None:
        """A batch's per-size losses ``(G,)`` and, for the accuracies, its scores (logits ``(G, B, C)`` or
        top-1 classes ``(G, B)``) against ``target`` ``(B,)``."""
        self.loss.update(per_size, target.shape[0])
        for accuracy in self.accuracies.values():
            accuracy.update(scores, target)

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{"{prefix}/{name}@{d}": value}`` of the epoch, and a reset. Every DDP process must call it
        (it synchronises the states). The loss is left out when no batch was seen."""
        values = {name: metric.compute().reshape(-1) for name, metric in self.accuracies.items()}
        if self.loss.update_called:
            values[self.loss_name] = self.loss.compute().reshape(-1)
        for metric in (*self.accuracies.values(), self.loss):
            metric.reset()
        # reshape: torchmetrics returns a one-size head's (1,) as a scalar
        return {
            f"{prefix}/{name}@{d}": v[g] for name, v in values.items() for g, d in enumerate(self.nesting)
        }
