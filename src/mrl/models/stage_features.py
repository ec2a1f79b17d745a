"""Earlier stages' feature maps of a timm backbone, from the same forward pass as the embedding.

timm describes a model's feature stages in ``model.feature_info`` (one entry per stage: module, channels,
reduction) and returns their maps with ``model.forward_intermediates(x, indices=[...])``, whose indices
are positions in that list; it also returns the final unpooled features, which ``forward_head`` pools
into exactly what ``model(x)`` gives. So one pass yields both the embedding and the stage maps.
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


@torch.no_grad()
def measure_stage_channels(backbone: TimmBackbone, stages: Sequence[int]) -> list[int]:
    """The channel count of each stage's map, measured with one forward pass on a random image of the
    size the backbone was built for. It also checks that timm returns NCHW maps for these stages and
    that the one-pass embedding is the backbone's own (``forward_head`` of the final features)."""
    size = backbone.img_size or backbone.data_config()["input_size"][-1]
    x = torch.rand(2, backbone.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    was_training = backbone.training
    backbone.eval()
    try:
        z, maps = forward_with_stages(backbone, x, stages)
        same = torch.allclose(z, backbone(x), rtol=1e-4, atol=1e-5)
    finally:
        backbone.train(was_training)
    if not same:
        raise MRLError(
            f"Backbone '{backbone.name}': timm's forward_intermediates does not reproduce the model's own "
            "embedding (its forward does more than forward_head(forward_features(x))), so depth heads "
            "cannot share its forward pass. Use another backbone, or head.depth_stages=null."
        )
    if any(m.dim() != 4 for m in maps):
        raise MRLError(
            f"Backbone '{backbone.name}' returns intermediate features of shapes "
            f"{[tuple(m.shape) for m in maps]}, not (B, C, H, W) maps, so they cannot be pooled for "
            "head.depth_stages. Use another backbone, or head.depth_stages=null."
        )
    return [int(m.shape[1]) for m in maps]


def forward_with_stages(
    backbone: TimmBackbone, x: torch.Tensor, stages: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(z, maps)``: the embedding ``backbone(x)`` and the feature maps of ``stages``, in one pass."""
    final, maps = backbone.model.forward_intermediates(x, indices=list(stages))
    return backbone.projection(backbone.model.forward_head(final)), list(maps)
