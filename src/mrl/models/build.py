"""One config -> the model's parts: backbone, Matryoshka head and loss (used by training and evaluation;
the deployment API rebuilds the same head with :func:`mrl.models.heads.build_head`)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from mrl.errors import MRLError
from mrl.instantiate import instantiate
from mrl.models.backbone import TimmBackbone
from mrl.models.depth import DepthMatryoshka
from mrl.models.heads import build_head
from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.matryoshka_contrastive import KINDS as CONTRASTIVE_KINDS
from mrl.nn.matryoshka_contrastive import MatryoshkaContrastiveLoss
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.size_sampling import SizeSampler


class ModelParts(NamedTuple):
    backbone: TimmBackbone
    head: MatryoshkaLinear
    # the Matryoshka objective: the head's cross-entropy or a contrastive loss, c_m, the size sampler
    loss: MatryoshkaLoss
    # stage heads (2D Matryoshka), None when off
    depth: DepthMatryoshka | None = None
    # with a contrastive objective, the cross-entropy of the head, an online probe on the embedding
    probe: MatryoshkaCrossEntropy | None = None


# The `head` config group is what users override (head=mrl_e, head.nesting, head.weights): its keys
# configure the head itself or, for these, the Matryoshka loss that trains it (sizes_per_step: random
# sizes per step; depth_*: prefix losses on earlier stages, see mrl.models.depth).
HEAD_KEYS = ("kind", "nesting", "min_size", "dim", "bias")
LOSS_KEYS = ("weights", "fused", "sizes_per_step", "depth_stages", "depth_weight")


def split_head_config(head_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(head settings, loss settings)`` of the ``head`` config node; an unknown key is an error, not a
    setting silently ignored."""
    unknown = sorted(set(head_cfg) - set(HEAD_KEYS) - set(LOSS_KEYS))
    if unknown:
        raise MRLError(
            f"head.{unknown[0]} is not a head setting. The head takes {', '.join(HEAD_KEYS)} and, for its "
            f"loss, {', '.join(LOSS_KEYS)} (conf/head/mrl.yaml); fix the spelling or drop it."
        )
    head = {k: head_cfg[k] for k in HEAD_KEYS if k in head_cfg}
    loss = {k: head_cfg[k] for k in LOSS_KEYS if k in head_cfg}
    return head, loss


def build_parts(cfg: DictConfig, num_classes: int, in_chans: int, img_size: int) -> ModelParts:
    """Backbone (``cfg.backbone``), head and loss (``cfg.head``, ``cfg.loss``) for images of this shape."""
    backbone = instantiate(cfg.backbone, in_chans=in_chans, img_size=img_size)
    head_settings, loss_settings = split_head_config(OmegaConf.to_container(cfg.head, resolve=True))
    head = build_head(embed_dim=backbone.embed_dim, num_classes=num_classes, **head_settings)
    weights = loss_settings.get("weights")
    check_loss_weights(weights, head.nesting)
    per_step = loss_settings.get("sizes_per_step")
    sampler = None if per_step is None else SizeSampler(len(head.nesting), per_step, cfg.get("seed") or 0)
    cross_entropy = MatryoshkaCrossEntropy(fused=loss_settings.get("fused", True), **cfg.get("loss", {}))
    contrastive = build_objective(cfg, head)
    per_size_loss = cross_entropy if contrastive is None else contrastive
    loss = MatryoshkaLoss(weights, per_size_loss=per_size_loss, sampler=sampler)
    stages = loss_settings.get("depth_stages")
    depth = None
    if stages is not None:  # the stage heads share the final head's objective
        depth = DepthMatryoshka(backbone, head, stages, loss, loss_settings.get("depth_weight", 1.0))
    return ModelParts(backbone, head, loss, depth, None if contrastive is None else cross_entropy)


def check_loss_weights(weights: list | None, nesting: list[int]) -> None:
    """``head.weights``: one finite, non-negative relative importance per size, not all zero (a loss
    weighted by zeros never moves, and the run would report an untrained model)."""
    if weights is None:
        return
    if len(weights) != len(nesting):
        raise MRLError(
            f"head.weights has {len(weights)} entries but the head trains {len(nesting)} sizes "
            f"{nesting}: give one relative importance weight per size, or head.weights=null."
        )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        values = [float("nan")]
    if not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        raise MRLError(
            f"head.weights={list(weights)} cannot train: each size's weight must be a finite number >= 0 "
            "and at least one must be positive (the loss is their weighted sum). Use e.g. "
            f"head.weights=[{','.join('1' for _ in nesting)}] or head.weights=null."
        )


OBJECTIVE_KINDS = ("ce", *CONTRASTIVE_KINDS)


def build_objective(cfg: DictConfig, head: MatryoshkaLinear) -> MatryoshkaContrastiveLoss | None:
    """The contrastive per-size loss of ``cfg.objective`` over the head's sizes, or None for cross-entropy
    (``objective=ce``, the default, and configs written before the ``objective`` group existed).

    :func:`build_parts` wraps it in the run's :class:`MatryoshkaLoss` (``head.weights``, the size
    sampler), the one place that weighs sizes.
    """
    objective = cfg.get("objective") or {}
    kind = str(objective.get("kind", "ce"))
    if kind == "ce":
        return None
    return MatryoshkaContrastiveLoss(
        head.nesting,
        kind=kind,
        temperature=float(objective.get("temperature", 0.1)),
        views=int(objective.get("views", 2)),
    )
