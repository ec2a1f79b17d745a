"""Every per-size metric a training run logs once per epoch, by logged key."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl.models.depth import DepthMatryoshka
from mrl.nn.per_size_metrics import PerSizeMetrics
from mrl.nn.size_sampling import SizeSampler

STAGES = ("train", "val", "test")


class EpochMetrics(nn.Module):
    """The head's ``{stage}/acc@{d}``, ``top5@{d}`` (validation and test, with ``top5``) and
    ``loss@{d}``; with ``contrastive``, the per-size losses of the objective that trains the embedding
    beside the head, ``train/{objective_loss}@{d}`` (``contrastive_loss``, or a frozen-feature head's).
    :meth:`compute` adds the training
    helpers' epoch metrics: the depth heads' and the size sampler's ``train/sampled@{d}``.

    Every value is a torchmetrics state reduced across DDP processes, so they are logged without
    ``sync_dist`` and every process must call :meth:`compute`.
    """

    def __init__(
        self,
        nesting: Sequence[int],
        top5: bool,
        contrastive: bool = False,
        objective_loss: str = "contrastive_loss",
    ) -> None:
        super().__init__()
        self.nesting = list(nesting)
        # keyed "{stage}_head": "train" is taken (nn.Module.train)
        self.heads = nn.ModuleDict(
            {
                f"{stage}_head": PerSizeMetrics(nesting, top_k=(1, 5) if top5 and stage != "train" else (1,))
                for stage in STAGES
            }
        )
        self.contrastive = (
            PerSizeMetrics(nesting, top_k=(), loss_name=objective_loss) if contrastive else None
        )

    def update(self, stage: str, per_size: torch.Tensor, target: torch.Tensor, scores: torch.Tensor) -> None:
        """A batch of the head: its per-size losses ``(G,)`` and scores (logits or top-1 classes)."""
        self.heads[f"{stage}_head"].update(per_size, target, scores)

    def update_contrastive(self, per_size: torch.Tensor, target: torch.Tensor) -> None:
        """A training batch's per-size contrastive losses ``(G,)``; ``target`` ``(B,)`` counts its images."""
        self.contrastive.update(per_size, target)

    def compute(
        self, stage: str, depth: DepthMatryoshka | None = None, sampler: SizeSampler | None = None
    ) -> dict[str, torch.Tensor]:
        """The epoch's values of ``stage`` by logged key, and a reset."""
        values = self.heads[f"{stage}_head"].compute(stage)
        if depth is not None:
            values.update(depth.epoch_metrics(stage))
        if stage == "train":
            fractions = None if sampler is None else sampler.drawn_fractions()
            for d, fraction in zip(self.nesting, [] if fractions is None else fractions, strict=False):
                values[f"train/sampled@{d}"] = fraction
            if self.contrastive is not None:
                values.update(self.contrastive.compute("train"))
        return values
