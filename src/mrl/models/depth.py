"""2D (depth x width) Matryoshka training: prefix losses on earlier stages of the backbone.

``head.depth_stages=[s, ...]`` adds, for each chosen stage ``s`` of a timm backbone, a pooled and
projected stage embedding with its own Matryoshka head (:class:`mrl.nn.stage_heads.StageHeads`); the
training loss becomes ``final + depth_weight * sum_s sum_m c_m * CE_{s,m}``, each stage weighed by the
final head's objective (its ``c_m``, cross-entropy settings and the batch's size draw). The stage heads
are trained with the model and evaluated on every split, but they are not the model: ``mrl-eval``
embeddings and ``mrl.load`` use the final embedding only (``mrl.load`` reads the ``backbone.`` and
``head.`` weights). The stage maps come from the backbone's own pass (``backbone(x, stages=...)``), so
``compile=true`` covers them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl.models.backbone import TimmBackbone
from mrl.models.stage_features import check_depth_stages, check_stage_maps, stage_channels
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.per_size_metrics import PerSizeMetrics
from mrl.nn.stage_heads import StageHeads

SPLITS = ("train", "val", "test")


class DepthMatryoshka(nn.Module):
    """The stage heads of ``stages``, trained with ``loss`` (the final head's cross-entropy objective, the
    same module) times ``weight``, and their per-size accuracy and loss, logged as
    ``{split}/depth{s}/acc@{d}`` and ``{split}/depth{s}/loss@{d}``."""

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
        self.weight = float(weight)
        self.nesting = list(head.nesting)
        self.heads = StageHeads(
            stage_channels(backbone, self.stages),
            head.in_features,
            head.num_classes,
            head.nesting,
            efficient=head.efficient,
            bias=head.bias is not None,
            fused=head.fused,
        )
        self.loss = loss
        self.metrics = nn.ModuleDict(
            {f"{split}_{s}": PerSizeMetrics(self.nesting) for split in SPLITS for s in self.stages}
        )

    def embed(self, backbone: TimmBackbone, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final embedding ``backbone(x)`` and each stage's embedding, from one backbone pass."""
        z, maps = backbone(x, stages=self.stages)
        check_stage_maps(backbone, maps)
        return z, self.heads.embed(maps)

    def step_loss(
        self,
        stage_embeddings: Sequence[torch.Tensor],
        target: torch.Tensor,
        split: str,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``depth_weight * sum_s loss.combine(per_size_s, sizes)`` (``sizes``: the batch's draw, see
        :meth:`MatryoshkaLoss.draw`); records each stage's per-size accuracy and loss for the epoch (on
        the device: nothing is read back here)."""
        training = split == "train" and torch.is_grad_enabled()
        total = torch.zeros((), device=target.device)
        for s, z, head in zip(self.stages, stage_embeddings, self.heads.heads, strict=True):
            per_size, scores = self.loss.per_size_loss.per_size_and_scores(
                head, z, target, logits=not training
            )
            self.metrics[f"{split}_{s}"].update(per_size, target, scores.detach())
            total = total + self.loss.combine(per_size, sizes)
        return self.weight * total

    def epoch_metrics(self, split: str) -> dict[str, torch.Tensor]:
        """The epoch's ``{split}/depth{s}/acc@{d}`` and ``loss@{d}`` by logged key, and a reset (every DDP
        process calls it: torchmetrics synchronises the states)."""
        values = {}
        for s in self.stages:
            values.update(self.metrics[f"{split}_{s}"].compute(f"{split}/depth{s}"))
        return values
