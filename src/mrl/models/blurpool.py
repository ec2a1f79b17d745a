"""The BlurPool of FFCV's ResNet recipe, which the paper's published ResNet-50 checkpoints were trained with.

Every strided convolution with at least 16 input channels first smooths its input with a fixed 3x3
binomial filter (``[1, 2, 1]`` outer itself, divided by 16; stride 1, zero padding 1, one filter per
channel), then convolves as before. This differs from timm's ``BlurPool2d`` anti-aliasing layer (which
blurs *after* a stride-1 convolution, with reflect padding), so it is its own module here.

The convolution stays a child named ``conv``: a wrapped layer's weight is ``<layer>.conv.weight``, the
name those checkpoints use. The filter is a constant and not part of the state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# which convolutions get the blur (FFCV's rule): strided, and not the stem's RGB input
MIN_BLUR_CHANNELS = 16


def binomial_filter(channels: int) -> torch.Tensor:
    """The ``(channels, 1, 3, 3)`` depthwise blur kernel: ``[1, 2, 1]`` outer ``[1, 2, 1]`` / 16."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(row, row) / 16.0).expand(channels, 1, 3, 3).clone()


class BlurStridedConv(nn.Module):
    """``conv(blur(x))``: the binomial blur, then the strided convolution ``conv``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", binomial_filter(conv.in_channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def blur_strided_convs(module: nn.Module) -> int:
    """Wrap every strided ``Conv2d`` with at least :data:`MIN_BLUR_CHANNELS` input channels inside
    ``module`` in a :class:`BlurStridedConv`, in place; returns how many were wrapped."""
    wrapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= MIN_BLUR_CHANNELS:
            setattr(module, name, BlurStridedConv(child))
            wrapped += 1
        elif not isinstance(child, BlurStridedConv):
            wrapped += blur_strided_convs(child)
    return wrapped
