"""The cross-entropy of every size of a Matryoshka head: the per-size loss of a classifier's Matryoshka
objective (:class:`mrl.nn.matryoshka_loss.MatryoshkaLoss` weighs the sizes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrl.nn.folded_cross_entropy import fold_pays, folded_matryoshka_cross_entropy
from mrl.nn.fused_cross_entropy import matryoshka_cross_entropy
from mrl.nn.matryoshka_linear import MatryoshkaLinear


class MatryoshkaCrossEntropy(nn.Module):
    """``CE(logits[g], target)`` of every size ``g``, unweighted, shape ``(G,)``.

    ``cross_entropy_kwargs`` go to :func:`torch.nn.functional.cross_entropy` (``label_smoothing``,
    ``ignore_index``, ``weight`` for per-class weights, ``reduction`` of ``"mean"`` or ``"sum"``).
    With ``fused=True`` (the default) every size's loss comes from one batched cross-entropy call over
    the ``(G * B, C)`` logits; ``fused=False`` calls cross-entropy once per size like the paper's code.
    Both give the same value and gradients.
    """

    def __init__(self, fused: bool = True, **cross_entropy_kwargs) -> None:
        super().__init__()
        reduction = cross_entropy_kwargs.pop("reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"MatryoshkaLoss supports reduction='mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        class_weight = cross_entropy_kwargs.pop("weight", None)
        # A buffer follows the module (and so the logits) across devices with .to() / Lightning.
        self.register_buffer(
            "class_weight",
            None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32),
        )
        self.fused = bool(fused)
        self.ce_kwargs = cross_entropy_kwargs

    def per_size(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of every size of ``logits`` ``(G, B, C)`` for ``target`` ``(B,)``, shape ``(G,)``."""
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
        if not self._one_node(head):
            logits = head(z)
            return self.per_size(logits, target), (logits.argmax(2) if predict else None)
        out = matryoshka_cross_entropy(
            z,
            head.weight,
            head.bias,
            target,
            head.nesting,
            head.efficient,
            predict=predict,
            **self._options(),
        )
        return out if predict else (out, None)

    def per_size_from_projection(
        self,
        head: MatryoshkaLinear,
        projection: nn.Linear,
        h: torch.Tensor,
        target: torch.Tensor,
        predict: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`per_size_from_embedding` of ``z = projection(h)``. A training step where that is cheaper
        folds the projection into the head's classifiers instead of forming ``z``
        (:mod:`mrl.nn.folded_cross_entropy`); same values and gradients either way."""
        fold = (
            torch.is_grad_enabled()
            and self._one_node(head)
            and fold_pays(h, projection, head.num_classes, head.nesting, head.efficient)
        )
        if not fold:
            return self.per_size_from_embedding(head, projection(h), target, predict)
        out = folded_matryoshka_cross_entropy(
            h,
            projection.weight,
            projection.bias,
            head.weight,
            head.bias,
            target,
            head.nesting,
            head.efficient,
            predict=predict,
            **self._options(),
        )
        return out if predict else (out, None)

    def _one_node(self, head: MatryoshkaLinear) -> bool:
        """Whether the head and this loss run as one node: options it does not implement (a
        ``cross_entropy_kwargs`` key other than these two) fall back to head then loss."""
        return self.fused and head.fused and not set(self.ce_kwargs) - {"ignore_index", "label_smoothing"}

    def _options(self) -> dict:
        """The one-node cross-entropy's keyword arguments."""
        return {
            "class_weight": self.class_weight,
            "ignore_index": self.ce_kwargs.get("ignore_index", -100),
            "label_smoothing": self.ce_kwargs.get("label_smoothing", 0.0),
            "reduction": self.reduction,
        }

    def per_size_and_scores(
        self, head: MatryoshkaLinear, z: torch.Tensor, target: torch.Tensor, logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-size losses ``(G,)`` of ``head`` on ``z`` and the scores accuracy is measured on: with
        ``logits`` the logits ``(G, B, C)`` (evaluation: top-5 accuracy needs them), else each size's top-1
        class ``(G, B)`` from the one-node head and loss (training: no logits are kept)."""
        if not logits:
            return self.per_size_from_embedding(head, z, target, predict=True)
        scores = head(z)
        return self.per_size(scores, target), scores
