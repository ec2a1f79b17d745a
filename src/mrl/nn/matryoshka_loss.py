"""The Matryoshka loss: a weighted sum over prefix sizes of the cross-entropy of each size's logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrl.nn.fused_cross_entropy import matryoshka_cross_entropy
from mrl.nn.matryoshka_linear import MatryoshkaLinear


class MatryoshkaLoss(nn.Module):
    """``sum_g c_g * CE(logits[g], target)`` over the sizes of a :class:`MatryoshkaLinear`.

    ``weights`` are the relative importance ``c_m`` of each size (default 1 each, as the paper);
    ``cross_entropy_kwargs`` go to :func:`torch.nn.functional.cross_entropy` (``label_smoothing``,
    ``ignore_index``, ``weight`` for per-class weights, ``reduction`` of ``"mean"`` or ``"sum"``).

    With ``fused=True`` (the default) every size's loss comes from one batched cross-entropy call over
    the ``(G * B, C)`` logits; ``fused=False`` calls cross-entropy once per size like the paper's code.
    Both give the same value and gradients.
    """

    def __init__(self, weights: Sequence[float] | None = None, fused: bool = True, **cross_entropy_kwargs):
        super().__init__()
        reduction = cross_entropy_kwargs.pop("reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"MatryoshkaLoss supports reduction='mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        class_weight = cross_entropy_kwargs.pop("weight", None)
        # Buffers follow the module (and so the logits) across devices with .to() / Lightning.
        self.register_buffer(
            "weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        )
        self.register_buffer(
            "class_weight",
            None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32),
        )
        self.fused = bool(fused)
        self.ce_kwargs = cross_entropy_kwargs

    def _size_weights(self, num_sizes: int, like: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return torch.ones(num_sizes, device=like.device, dtype=like.dtype)
        if self.weights.numel() != num_sizes:
            raise ValueError(
                f"MatryoshkaLoss has {self.weights.numel()} relative importance weights but the logits "
                f"have {num_sizes} sizes; give one weight per size in head.nesting."
            )
        return self.weights.to(device=like.device, dtype=like.dtype)

    def per_size(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of every size, shape ``(G,)``."""
        if logits.dim() != 3:
            raise ValueError(f"MatryoshkaLoss expects logits of shape (G, B, C), got {tuple(logits.shape)}")
        class_weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        if not self.fused:
            return torch.stack(
                [
                    F.cross_entropy(
                        lg, target, weight=class_weight, reduction=self.reduction, **self.ce_kwargs
                    )
                    for lg in logits
                ]
            )
        num_sizes, batch, num_classes = logits.shape
        losses = F.cross_entropy(
            logits.reshape(num_sizes * batch, num_classes),
            target.repeat(num_sizes),
            weight=class_weight,
            reduction="none",
            **self.ce_kwargs,
        ).view(num_sizes, batch)
        if self.reduction == "sum":
            return losses.sum(dim=1)
        # The same normaliser as cross_entropy's "mean": the (class-weighted) count of kept targets.
        ignore_index = self.ce_kwargs.get("ignore_index", -100)
        kept = target != ignore_index
        keep = kept.to(logits.dtype)
        if class_weight is not None:
            keep = keep * class_weight[torch.where(kept, target, 0)]
        return losses.sum(dim=1) / keep.sum()

    def per_size_from_embedding(
        self, head: MatryoshkaLinear, z: torch.Tensor, target: torch.Tensor, predict: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-size losses ``(G,)`` of ``head`` on the embedding ``z``, and top-1 predictions ``(G, B)``
        when ``predict`` (else ``None``).

        With a fused head and loss (the defaults) the head and the cross-entropy run as one autograd node
        (:mod:`mrl.nn.fused_cross_entropy`), which keeps one ``(G, B, C)`` buffer per step instead of
        three; otherwise this is ``per_size(head(z), target)``. Same values and gradients either way.
        """
        # Options the one-node cross-entropy does not implement fall back to head then loss.
        if not (self.fused and head.fused) or set(self.ce_kwargs) - {"ignore_index", "label_smoothing"}:
            logits = head(z)
            return self.per_size(logits, target), (logits.argmax(2) if predict else None)
        out = matryoshka_cross_entropy(
            z,
            head.weight,
            head.bias,
            target,
            head.nesting,
            head.efficient,
            class_weight=self.class_weight,
            ignore_index=self.ce_kwargs.get("ignore_index", -100),
            label_smoothing=self.ce_kwargs.get("label_smoothing", 0.0),
            reduction=self.reduction,
            predict=predict,
        )
        return out if predict else (out, None)

    def combine(self, per_size: torch.Tensor) -> torch.Tensor:
        """The weighted sum ``sum_g c_g * per_size[g]`` of per-size losses."""
        return (self._size_weights(per_size.shape[0], per_size) * per_size).sum()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.combine(self.per_size(logits, target))
