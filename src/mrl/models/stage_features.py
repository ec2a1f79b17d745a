"""Earlier stages' feature maps of a timm backbone, from the same forward pass as the embedding.

timm describes a model's feature stages in ``model.feature_info`` (one entry per stage: module, channels,
reduction) and returns their maps with ``model.forward_intermediates(x, indices=[...])``, whose indices
are positions in that list; ``TimmBackbone(x, stages=[...])`` gives them with the embedding, from one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mrl.errors import MRLError
from mrl.models.backbone import TimmBackbone


def feature_stages(backbone: TimmBackbone) -> list[dict]:
    """timm's ``feature_info`` entries of the backbone's model (empty when it has none)."""
    info = getattr(backbone.model, "feature_info", None)
    info = getattr(info, "info", info)  # a FeatureInfo object (features_only models) holds the list
    if not isinstance(info, list | tuple) or not hasattr(backbone.model, "forward_intermediates"):
        return []
    return [dict(entry) for entry in info]


def depth_stage_choices(backbone: TimmBackbone) -> list[int]:
    """The stage indices a depth head may use: all but the last (its pooled map is the embedding's)."""
    return list(range(max(0, len(feature_stages(backbone)) - 1)))


def check_depth_stages(backbone: TimmBackbone, stages: Sequence[int]) -> list[int]:
    """``stages`` as a sorted list of valid stage indices, or an :class:`MRLError` listing the choices."""
    infos = feature_stages(backbone)
    if not infos:
        raise MRLError(
            f"head.depth_stages needs a backbone that exposes its intermediate features (timm's "
            f"feature_info and forward_intermediates), and backbone '{backbone.name}' does not. Pick a "
            "timm model that has them (ResNets, ConvNeXts, EfficientNets, ViTs, ...: "
            "timm.create_model(name).feature_info lists them), or set head.depth_stages=null."
        )
    choices = depth_stage_choices(backbone)
    listed = ", ".join(
        f"{i} ({infos[i].get('module', '?')}, {infos[i].get('num_chs', '?')} channels)" for i in choices
    )
    is_list = isinstance(stages, list | tuple)
    stages = list(stages) if is_list else [stages]
    bad = [s for s in stages if not (isinstance(s, int) and not isinstance(s, bool) and s in choices)]
    if bad or not is_list or not stages or len(set(stages)) != len(stages):
        last, shown = len(infos) - 1, stages if is_list else stages[0]
        example = f"For example head.depth_stages=[{choices[-1]}], or " if choices else "Set "
        raise MRLError(
            f"head.depth_stages={shown!r} is not valid for backbone '{backbone.name}': give distinct "
            f"stage indices from its earlier stages: {listed or 'none (it has a single stage)'}. "
            f"Stage {last} ({infos[last].get('module', '?')}) is the last one, whose pooled features are "
            f"the embedding the main head already trains. {example}head.depth_stages=null."
        )
    return sorted(stages)


def stage_channels(backbone: TimmBackbone, stages: Sequence[int]) -> list[int]:
    """The channel count of each stage's feature map, from timm's ``feature_info`` (``num_chs``)."""
    infos = feature_stages(backbone)
    return [int(infos[s]["num_chs"]) for s in stages]


def check_stage_maps(backbone: TimmBackbone, maps: Sequence[torch.Tensor]) -> None:
    """Refuse stage features that are not ``(B, C, H, W)`` maps (they cannot be pooled per channel)."""
    if any(m.dim() != 4 for m in maps):
        raise MRLError(
            f"Backbone '{backbone.name}' returns intermediate features of shapes "
            f"{[tuple(m.shape) for m in maps]}, not (B, C, H, W) maps, so they cannot be pooled for "
            "head.depth_stages. Use another backbone, or head.depth_stages=null."
        )
