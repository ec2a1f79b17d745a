"""2D (depth x width) Matryoshka training: prefix losses on earlier stages of the backbone.

``head.depth_stages=[s, ...]`` adds, for each chosen stage ``s`` of a timm backbone, a pooled and
projected stage embedding with its own Matryoshka head (:class:`mrl.nn.stage_heads.StageHeads`); the
training loss becomes ``final + depth_weight * sum_s sum_m c_m * CE_{s,m}``. The stage heads are trained
with the model and evaluated on every split, but they are not the model: ``mrl-eval`` embeddings and
``mrl.load`` use the final embedding only (``mrl.load`` reads the ``backbone.`` and ``head.`` weights).
The backbone pass goes through timm's ``forward_intermediates``, not ``backbone(x)``, so ``compile=true``
(which compiles ``backbone(x)``) does not speed it up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl.models.backbone import TimmBackbone
from mrl.models.stage_features import check_depth_stages, forward_with_stages, measure_stage_channels
from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.stage_heads import StageHeads

SPLITS = ("train", "val", "test")


class DepthMatryoshka(nn.Module):
    """The stage heads of ``stages``, their loss (``loss``: the final head's cross-entropy settings and
    ``c_m``) and their per-size accuracy and loss, logged as ``{split}/depth{s}/acc@{d}`` and
    ``{split}/depth{s}/loss@{d}``."""

    def __init__(
        self,
        backbone: TimmBackbone,
        head: MatryoshkaLinear,
        stages: Sequence[int],
        loss: MatryoshkaLoss,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.stages = check_depth_stages(backbone, stages)
        channels = measure_stage_channels(backbone, self.stages)
        self.weight = float(weight)
        self.nesting = list(head.nesting)
        self.heads = StageHeads(
            channels,
            head.in_features,
            head.num_classes,
            head.nesting,
            efficient=head.efficient,
            bias=head.bias is not None,
            fused=head.fused,
        )
        self.loss = loss
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{s}": MatryoshkaAccuracy(len(self.nesting), top_k=1)
                for split in SPLITS
                for s in self.stages
            }
        )
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def embed(self, backbone: TimmBackbone, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final embedding ``backbone(x)`` and each stage's embedding, from one backbone pass."""
        z, maps = forward_with_stages(backbone, x, self.stages)
        return z, self.heads.embed(maps)

    def step_loss(
        self,
        stage_embeddings: Sequence[torch.Tensor],
        target: torch.Tensor,
        split: str,
        size_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``depth_weight * sum_s combine(per_size_s * size_weights)``; records each stage's per-size
        accuracy and loss for the epoch (on the device: nothing is read back here)."""
        training = split == "train" and torch.is_grad_enabled()
        total = torch.zeros((), device=target.device)
        for s, z, head in zip(self.stages, stage_embeddings, self.heads.heads, strict=True):
            if training:
                per_size, scores = self.loss.per_size_from_embedding(head, z, target, predict=True)
            else:
                scores = head(z)
                per_size = self.loss.per_size(scores, target)
            key = f"{split}_{s}"
            self.metrics[key].update(scores.detach(), target)
            self._loss_sums[key] = self._loss_sums.get(key, 0) + per_size.detach() * target.shape[0]
            self._counts[key] = self._counts.get(key, 0) + target.shape[0]
            total = total + self.loss.combine(per_size if size_weights is None else per_size * size_weights)
        return self.weight * total

    def epoch_metrics(self, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(accuracies, losses)`` of the epoch by logged key, and resets them. The accuracies are
        torchmetrics values (already synchronised across DDP processes); the losses are this process's
        means, to log with ``sync_dist=True``."""
        accuracies, losses = {}, {}
        for s in self.stages:
            key = f"{split}_{s}"
            metric = self.metrics[key]
            top1 = metric.compute().reshape(-1)  # every rank computes: it synchronises the states
            metric.reset()
            sums, count = self._loss_sums.pop(key, None), self._counts.pop(key, 0)
            for g, d in enumerate(self.nesting):
                accuracies[f"{split}/depth{s}/acc@{d}"] = top1[g]
                if sums is not None:
                    losses[f"{split}/depth{s}/loss@{d}"] = sums[g] / count
        return accuracies, losses
