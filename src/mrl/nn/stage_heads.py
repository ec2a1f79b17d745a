"""Matryoshka heads on earlier stages of a network: the depth axis of 2D (depth x width) Matryoshka.

Each chosen stage's feature map is average-pooled and mapped by a linear projection to the embedding
size ``D``, and that stage embedding gets its own :class:`MatryoshkaLinear` over the same nesting list as
the final head. The projection is needed because a CNN's earlier stages are narrower than the last one
(ResNet-50: 256, 512, 1024 channels against 2048), so their pooled features have no prefixes of the
sizes ``D`` is cut into; a learned map per stage gives every depth an embedding of the same sizes, so
``(stage, prefix)`` is one grid of models. (2DMSE truncates transformer layers directly: they all have
the model's width.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mrl.nn.matryoshka_linear import MatryoshkaLinear


def global_average_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)``: the mean over every position (timm's NCHW intermediates)."""
    return feature_map.flatten(2).mean(dim=2)


class StageHeads(nn.Module):
    """Per stage ``s``: pool, project ``channels[s] -> embed_dim``, classify every prefix.

    ``heads[s]`` is configured like the final head (``nesting``, ``efficient``, ``bias``, ``fused``).
    :meth:`embed` turns the stages' feature maps into their ``(B, embed_dim)`` embeddings.
    """

    def __init__(
        self,
        channels: Sequence[int],
        embed_dim: int,
        num_classes: int,
        nesting: Sequence[int],
        efficient: bool = False,
        bias: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(int(c), int(embed_dim)) for c in channels)
        self.heads = nn.ModuleList(
            MatryoshkaLinear(embed_dim, num_classes, nesting, efficient=efficient, bias=bias, fused=fused)
            for _ in channels
        )

    def embed(self, feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each stage's embedding ``(B, embed_dim)`` from its feature map ``(B, C_s, H, W)``."""
        return [
            projection(global_average_pool(fmap))
            for projection, fmap in zip(self.projections, feature_maps, strict=True)
        ]
