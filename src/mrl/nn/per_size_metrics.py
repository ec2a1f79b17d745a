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

    def update(self, per_size: torch.Tensor, batch_size: int | Sequence[int]) -> None:
        """``per_size``: a batch's mean loss of every size ``(G,)`` and ``batch_size`` its example count, or
        ``K`` batches' ``(K, G)`` and their ``K`` counts."""
        per_size = per_size.detach()
        if per_size.dim() == 1:
            self.sum += per_size * batch_size
            self.count += batch_size
            return
        counts = list(batch_size)
        if len(set(counts)) == 1:  # batches of one size (all but an epoch's last): one sum
            self.sum += per_size.sum(0) * counts[0]
        else:
            self.sum += sum(row * count for row, count in zip(per_size, counts, strict=True))
        self.count += sum(counts)

    def compute(self) -> torch.Tensor:
        # Divided by the count as a Python number, once per epoch: the arithmetic of a host-side count
        # (on CUDA a division by a host scalar is a multiplication by its reciprocal).
        return self.sum / int(self.count)


class PerSizeMetrics(nn.Module):
    """A head's per-size metrics on one split over an epoch: the top-``k`` accuracy for each ``k`` in
    ``top_k`` (named ``acc`` for top-1, ``top{k}`` otherwise) and the mean loss (named ``loss_name``).

    Accumulated on the device and computed once per epoch: one ``self.log`` call per size per step would
    cost more than a small model's step. A batch given as top-1 classes (training) or without scores waits
    in a short queue, and every ``PENDING_BATCHES`` batches (and before :meth:`compute`) the queued
    batches reach the torchmetrics states in one update. Why: an update is a few small tensor operations
    and torchmetrics' bookkeeping, Python time that a light head's step on cached features (milliseconds)
    pays at every step, and kernel launches on a GPU; queued, they are paid once per 64 batches.
    The queue holds the batch's own tensors (no copy), which no step writes to afterwards. Logits
    (evaluation, top-k) are counted at once: queuing them would hold ``(G, B, C)`` per batch.
    """

    PENDING_BATCHES = 64

    def __init__(self, nesting: Sequence[int], top_k: Sequence[int] = (1,), loss_name: str = "loss") -> None:
        super().__init__()
        self.nesting = list(nesting)
        self.accuracies = nn.ModuleDict(
            {("acc" if k == 1 else f"top{k}"): MatryoshkaAccuracy(len(self.nesting), top_k=k) for k in top_k}
        )
        self.loss = MatryoshkaLossMean(len(self.nesting))
        self.loss_name = loss_name
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def update(
        self, per_size: torch.Tensor, target: torch.Tensor, scores: torch.Tensor | None = None
    ) -> None:
        """A batch's per-size losses ``(G,)`` and, for the accuracies, its scores (logits ``(G, B, C)`` or
        top-1 classes ``(G, B)``) against ``target`` ``(B,)``."""
        if scores is None and self.accuracies:
            raise ValueError(
                "PerSizeMetrics.update needs scores (logits or top-1 classes) for its accuracies"
            )
        if scores is not None and scores.ndim != 2:
            self.loss.update(per_size, target.shape[0])
            for accuracy in self.accuracies.values():
                accuracy.update(scores, target)
            return
        self._pending.append((per_size.detach(), target, scores))
        if len(self._pending) >= self.PENDING_BATCHES:
            self._flush()

    def _flush(self) -> None:
        """The queued batches into the metrics' states, as one update of each."""
        if not self._pending:
            return
        losses, targets, classes = zip(*self._pending, strict=True)
        self._pending = []
        # the counts stay Python numbers: a tensor of them would be copied to the device
        self.loss.update(torch.stack(losses), [len(t) for t in targets])
        if self.accuracies:
            target = torch.cat(targets)
            scores = torch.cat(classes, 1)  # (G, sum of B): every queued batch's top-1 classes
            for accuracy in self.accuracies.values():
                accuracy.update(scores, target)

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{"{prefix}/{name}@{d}": value}`` of the epoch, and a reset. Every DDP process must call it
        (it synchronises the states). The loss is left out when no batch was seen."""
        self._flush()
        values = {name: metric.compute().reshape(-1) for name, metric in self.accuracies.items()}
        if self.loss.update_called:
            values[self.loss_name] = self.loss.compute().reshape(-1)
        for metric in (*self.accuracies.values(), self.loss):
            metric.reset()
        # reshape: torchmetrics returns a one-size head's (1,) as a scalar
        return {
            f"{prefix}/{name}@{d}": v[g] for name, v in values.items() for g, d in enumerate(self.nesting)
        }
