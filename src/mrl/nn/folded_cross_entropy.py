"""A linear projection and the Matryoshka head behind it folded into one classifier per size, with the
cross-entropy, in one autograd node: the training step of a projection on frozen features.

Size ``g``'s logits are ``z[:, :d_g] W_g^T + b_g`` with ``z = h P^T + p``, so they are also
``h F_g^T + c_g`` with ``F_g = W_g P[:d_g]`` (``C x H``) and ``c_g = W_g p[:d_g] + b_g`` (MRL-E: ``W_g``
the first ``d_g`` columns of the tied weight). When the sizes' classifiers have fewer rows together
(``G * C``) than the embedding has features, forming ``F`` each step and multiplying ``h`` by it once
costs fewer operations than the projection's product and its weight gradient: a 10-class head of nine
sizes on a 256-wide projection does 0.42x the multiply-adds (:func:`fold_pays` counts both). The values
and gradients are those of projection then head then cross-entropy (tests compare in float64); only the
order of the sums differs.

The cross-entropy's passes and its gradient buffer are :mod:`mrl.nn.fused_cross_entropy`'s, on the
``(B, G * C)`` logits of the one product viewed as ``(G, B, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from mrl.nn.fused import chunk_bounds
from mrl.nn.fused_cross_entropy import (
    CrossEntropyTargets,
    all_sizes_losses,
    logit_gradient_scale,
)

_FOLDABLE_DTYPES = (torch.float32, torch.float64)


def direct_multiply_adds(
    batch: int,
    in_features: int,
    dim: int,
    classes: int,
    nesting: Sequence[int],
    efficient: bool,
    input_grad: bool,
) -> int:
    """Multiply-adds of a training step of projection then head: the projection forward, its weight
    gradient (and its input's with ``input_grad``), and the head forward, its input and weight gradients."""
    projection = batch * in_features * dim * (3 if input_grad else 2)
    head_width = nesting[-1] if efficient else sum(nesting)
    return projection + 3 * batch * classes * head_width


def folded_multiply_adds(
    batch: int, in_features: int, classes: int, nesting: Sequence[int], efficient: bool, input_grad: bool
) -> int:
    """Multiply-adds of the same step folded: forming ``F`` (with the bias column) and its two weight
    gradients, then the one product with ``h``, its gradient for ``F`` (and for ``h`` with ``input_grad``)."""
    head_width = nesting[-1] if efficient else sum(nesting)
    fold = 3 * classes * head_width * (in_features + 1)
    return fold + batch * len(nesting) * classes * in_features * (3 if input_grad else 2)


def fold_pays(
    h: torch.Tensor, projection: torch.nn.Linear, classes: int, nesting: Sequence[int], efficient: bool
) -> bool:
    """Whether training folds ``projection`` into the head: on the CPU, in full precision without autocast
    (the one-node passes and buffers are the CPU's; a GPU's step is not bound by this head), and when the
    folded step does fewer multiply-adds."""
    weight = projection.weight
    if h.device.type != "cpu" or torch.is_autocast_enabled("cpu") or h.dim() != 2:
        return False
    if h.dtype not in _FOLDABLE_DTYPES or weight.dtype != h.dtype:
        return False
    batch, in_features = h.shape
    input_grad = h.requires_grad
    direct = direct_multiply_adds(
        batch, in_features, weight.shape[0], classes, nesting, efficient, input_grad
    )
    return folded_multiply_adds(batch, in_features, classes, nesting, efficient, input_grad) < direct


def _augmented(projection_weight: torch.Tensor, projection_bias: torch.Tensor | None) -> torch.Tensor:
    """``[P | p]`` ``(D, H + 1)``, or ``P`` without a bias: folding it folds the bias in the same product."""
    if projection_bias is None:
        return projection_weight
    return torch.cat([projection_weight, projection_bias.unsqueeze(1)], 1)


def _fold(
    augmented: torch.Tensor, weight: torch.Tensor, nesting: Sequence[int], efficient: bool
) -> torch.Tensor:
    """``F`` ``(G, C, H [+ 1])``: each size's classifier times the rows of ``augmented`` it reads. MRL-E's
    are running sums over the chunks between sizes (``F_g = F_{g-1} + W[:, chunk] P[chunk]``)."""
    folded = weight.new_empty((len(nesting), weight.shape[0], augmented.shape[1]))
    if efficient:
        for g, (start, stop) in enumerate(chunk_bounds(nesting)):
            if g == 0:
                torch.mm(weight[:, start:stop], augmented[start:stop], out=folded[0])
            else:
                torch.addmm(folded[g - 1], weight[:, start:stop], augmented[start:stop], out=folded[g])
        return folded
    for g, (m, block) in enumerate(zip(nesting, weight.split(list(nesting), 1), strict=True)):
        torch.mm(block, augmented[:m], out=folded[g])
    return folded


def _unfold_gradients(
    grad_folded: torch.Tensor,
    augmented: torch.Tensor,
    weight: torch.Tensor,
    nesting: Sequence[int],
    efficient: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the head's ``weight`` and of ``augmented`` from ``F``'s. Rows of ``augmented``
    past the largest size feed no logit: their gradient is zero. MRL-E's chunk ``k`` feeds every size
    from ``k`` on, so its gradient comes from the suffix sum of ``F``'s gradients (accumulated in place)."""
    grad_weight = torch.empty_like(weight)
    # Written, not zero-filled then accumulated: the largest size (MRL-E: the chunks) covers every row
    # up to nesting[-1]; zeroing a buffer of this size costs as much as one of the products.
    grad_augmented = torch.empty_like(augmented)
    grad_augmented[nesting[-1] :] = 0
    if efficient:
        acc = grad_folded[-1]
        for g, (start, stop) in reversed(list(enumerate(chunk_bounds(nesting)))):
            if g < len(nesting) - 1:
                acc.add_(grad_folded[g])
            torch.mm(acc, augmented[start:stop].t(), out=grad_weight[:, start:stop])
            torch.mm(weight[:, start:stop].t(), acc, out=grad_augmented[start:stop])
        return grad_weight, grad_augmented
    # each size's block of the untied weight and of its gradient (views), the largest size first
    blocks = zip(nesting, weight.split(list(nesting), 1), grad_weight.split(list(nesting), 1), strict=True)
    for g, (m, block, grad_block) in reversed(list(enumerate(blocks))):
        torch.mm(grad_folded[g], augmented[:m].t(), out=grad_block)
        if g == len(nesting) - 1:
            torch.mm(block.t(), grad_folded[g], out=grad_augmented[:m])
        else:
            grad_augmented[:m].addmm_(block.t(), grad_folded[g])
    return grad_weight, grad_augmented


class _FoldedMatryoshkaCrossEntropy(torch.autograd.Function):
    """Per-size losses ``(G,)`` (and optionally top-1 predictions ``(G, B)``) from ``h`` directly."""

    @staticmethod
    def forward(
        ctx, h, projection_weight, projection_bias, weight, bias, nesting, efficient, targets, predict
    ):
        batch, in_features = h.shape
        sizes, classes = len(nesting), weight.shape[0]
        augmented = _augmented(projection_weight, projection_bias)
        folded = _fold(augmented, weight, nesting, efficient)
        # (G * C, H): a view, each row of F_g followed by its bias column in memory.
        folded_rows = folded[..., :in_features].reshape(sizes * classes, in_features)
        offsets = None if projection_bias is None else folded[..., in_features]
        if bias is not None:
            offsets = (bias if offsets is None else offsets + bias).expand(sizes, classes)
        if offsets is None:
            logits = h @ folded_rows.t()
        else:
            logits = torch.addmm(offsets.reshape(-1), h, folded_rows.t())
        work = logits.view(batch, sizes, classes).transpose(0, 1)  # (G, B, C), the one-node passes' layout
        losses, predictions, exp_sums = all_sizes_losses(work, targets, predict)
        targets.to_logit_gradients(work, exp_sums)  # scaled per size and row in backward
        ctx.save_for_backward(h, augmented, weight, folded_rows)
        ctx.logits, ctx.exp_sums, ctx.targets = logits, exp_sums, targets
        ctx.nesting, ctx.efficient = nesting, efficient
        ctx.has_projection_bias, ctx.has_bias = projection_bias is not None, bias is not None
        if predictions is None:
            return losses
        ctx.mark_non_differentiable(predictions)
        return losses, predictions

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, *_):
        h, augmented, weight, folded_rows = ctx.saved_tensors
        logits = ctx.logits
        if logits is None:
            raise RuntimeError(
                "The folded Matryoshka cross-entropy was back-propagated twice (retain_graph=True): its "
                "buffer is reused for the gradients."
            )
        ctx.logits = None  # the buffer becomes the logit gradients below
        batch, in_features = h.shape
        sizes, classes = len(ctx.nesting), weight.shape[0]
        work = logits.view(batch, sizes, classes).transpose(0, 1)
        work.mul_(logit_gradient_scale(grad_losses, ctx.targets, ctx.exp_sums, logits.dtype))
        need_h, need_pw, need_pb, need_w, need_b = ctx.needs_input_grad[:5]
        grad_h = logits @ folded_rows if need_h else None
        grad_folded = logits.new_empty((sizes, classes, augmented.shape[1]))
        torch.mm(logits.t(), h, out=grad_folded[..., :in_features].view(sizes * classes, in_features))
        offset_grads = logits.sum(0).view(sizes, classes) if ctx.has_projection_bias or ctx.has_bias else None
        if ctx.has_projection_bias:
            grad_folded[..., in_features] = offset_grads
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = offset_grads.sum(0) if ctx.efficient else offset_grads.clone()
        grad_w, grad_augmented = None, None
        if need_w or need_pw or need_pb:
            grad_w, grad_augmented = _unfold_gradients(
                grad_folded, augmented, weight, ctx.nesting, ctx.efficient
            )
        grad_pw = grad_augmented[:, :in_features] if need_pw else None
        grad_pb = grad_augmented[:, in_features] if need_pb and ctx.has_projection_bias else None
        return grad_h, grad_pw, grad_pb, (grad_w if need_w else None), grad_b, None, None, None, None


def folded_matryoshka_cross_entropy(
    h: torch.Tensor,
    projection_weight: torch.Tensor,
    projection_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    nesting: Sequence[int],
    efficient: bool,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    predict: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-size cross-entropies ``(G,)`` of the head ``(weight, bias, nesting, efficient)`` on
    ``z = h @ projection_weight.T + projection_bias``, without forming ``z``; with ``predict=True`` also
    each size's top-1 class ``(G, B)``. Equal to
    :func:`~mrl.nn.fused_cross_entropy.matryoshka_cross_entropy` of ``z``; for full-precision CPU tensors
    (see :func:`fold_pays`)."""
    targets = CrossEntropyTargets(
        target, weight.shape[0], h.dtype, class_weight, ignore_index, label_smoothing, reduction
    )
    return _FoldedMatryoshkaCrossEntropy.apply(
        h,
        projection_weight,
        projection_bias,
        weight,
        bias,
        tuple(nesting),
        bool(efficient),
        targets,
        bool(predict),
    )
