"""The Matryoshka head and its cross-entropy in one autograd node, for training.

Head then loss as two nodes keeps three ``(G, B, C)`` buffers alive per step: the logits, their
log-softmax and the gradient of the log-softmax (each 200 MB for B=256, C=21841, G=9), and each
buffer is written and read again by a separate kernel. Here one buffer serves all three: each size's
logits are turned into probabilities in place right after their matmul, while still in cache (a
row's loss needs only its log-normaliser and target logit, see the three ways in ``forward``), and backward
forms each size's logit gradient ``s_g * (Q * P_g - q)`` inside that same buffer (for MRL-E, adds it
into one ``(B, C)`` running suffix sum) and feeds it straight to the matmuls. With many classes the CPU
lays the buffer out class-major, which its matmuls prefer, see :func:`_class_major`; with few, it runs
the softmax passes once over every size's logits instead, see :func:`_all_sizes_at_once`.
The cross-entropy follows :func:`torch.nn.functional.cross_entropy` exactly, including
``weight``, ``ignore_index``, ``label_smoothing`` and ``reduction`` (tests compare in float64).

Notation: ``P_g`` the softmax of size ``g``, ``w`` the class weights (1 without), ``k_i`` 1 for a kept
row (target not ``ignore_index``), ``eps`` the label smoothing. Row ``i``'s target mass is
``q_i = (1 - eps) k_i w_{y_i} e_{y_i} + (eps / C) k_i w`` and its loss ``-sum_c q_ic log P_gic``;
the gradient with respect to the logits is ``Q_i P_gi - q_i`` with ``Q_i = sum_c q_ic``, divided by
``sum_i k_i w_{y_i}`` for ``reduction="mean"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from mrl.nn import host_reads
from mrl.nn.fused import blas_inputs, chunk_bounds, tied_backward_matmuls, untied_backward_matmuls

_FULL_PRECISION = (torch.float32, torch.float64)

# One idle logits buffer per (shape, dtype, layout) on the CPU, reused by the next step. Why: a fresh
# (G, B, C) buffer is above glibc's mmap threshold at large class counts (200 MB at B=256, C=21841, G=9), so
# every step would map it anew and page-fault through all of it, which costs more than the softmax
# itself; the per-size formulation's (B, C) buffers stay below the threshold and are recycled by malloc.
# A buffer is taken out of the pool in forward and handed back after backward (or at the end of a
# forward that needs no gradient), so two graphs alive at once never share one. CUDA's caching
# allocator already recycles device memory, so device buffers are not pooled.
_IDLE_BUFFERS: dict[tuple, torch.Tensor] = {}


def _take_buffer(shape: tuple[int, ...], like: torch.Tensor, class_major: bool) -> torch.Tensor:
    """An uninitialised ``(..., B, C)`` buffer like ``like``; with ``class_major`` a transposed view of
    ``(..., C, B)`` memory (see :func:`_class_major`). Pooled on the CPU, see ``_IDLE_BUFFERS``."""
    if like.device.type == "cpu":
        buffer = _IDLE_BUFFERS.pop((shape, like.dtype, class_major), None)
        if buffer is not None:
            return buffer
    if not class_major:
        return like.new_empty(shape)
    return like.new_empty((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)


def _give_back(buffer: torch.Tensor) -> None:
    if buffer.device.type == "cpu":
        _IDLE_BUFFERS[(tuple(buffer.shape), buffer.dtype, buffer.stride(-1) != 1)] = buffer


def _shifted_exp_into(
    logits: torch.Tensor, out: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor
) -> None:
    """``out = exp(logits - row_max)`` for class-major ``out``, with each row's largest logit and the sum
    of its exponentials written to ``row_max`` and ``row_sum`` ``(B,)``: a softmax left unnormalised.

    Why not ``torch.softmax``: on the CPU it is several times slower over a dimension whose stride is not
    1 than over a contiguous one, while these passes reduce and broadcast along the contiguous batch
    dimension (benchmarks/head_loss.py times both). The division by ``row_sum`` is left to the few places
    that need it (the loss reads ``lse = row_max + log(row_sum)``; backward folds ``1 / row_sum`` into its
    per-row scale), which saves a pass over the buffer. ``out`` may be ``logits``.
    """
    if logits.dtype != out.dtype:  # low-precision logits: the softmax runs in out's dtype (float32)
        out.copy_(logits)
        logits = out
    torch.amax(logits, 1, out=row_max)
    torch.sub(logits, row_max.unsqueeze(1), out=out).exp_()
    torch.sum(out, 1, out=row_sum)


class CrossEntropyTargets:
    """Per-row quantities of the cross-entropy that do not depend on the size ``g``, in the loss's dtype:
    ``dtype``, the matmuls', or float32 for a lower precision."""

    def __init__(
        self,
        target: torch.Tensor,
        num_classes: int,
        dtype: torch.dtype,
        class_weight: torch.Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"the one-node cross-entropy takes reduction='mean' or 'sum', got {reduction!r}")
        dtype = dtype if dtype in _FULL_PRECISION else torch.float32
        kept = target != ignore_index
        self.eps = float(label_smoothing)
        self.num_classes = num_classes
        self.class_weight = None if class_weight is None else class_weight.to(dtype)
        self.total_class_weight = num_classes if class_weight is None else self.class_weight.sum()
        # The common case: no class weights and no ignored row, so every row weighs 1 and the per-row
        # tensors below are the number 1 (the many small ops that build them cost more than this whole
        # head's arithmetic at a small batch on the CPU). Checked on the CPU only: on a GPU the check
        # would make the host wait every step, and the tensors cost a few cheap passes there.
        self.unit_mass = (
            class_weight is None and host_reads.host_reads_are_free(target.device) and bool(kept.all())
        )
        self.kept: torch.Tensor | float
        self.row_weight: torch.Tensor | float
        self.mass: torch.Tensor | float
        self.denominator: torch.Tensor | float | None
        if self.unit_mass:  # the "mean" normaliser is then the batch size
            self.index = target.unsqueeze(1)  # (B, 1)
            self.kept = self.row_weight = self.mass = 1.0
            self.denominator = float(len(target)) if reduction == "mean" else None
            return
        self.index = torch.where(kept, target, 0).unsqueeze(1)  # gather/scatter-safe targets (B, 1)
        self.kept = kept.to(dtype)
        # k_i w_{y_i}: the weight of row i's target term and, summed, the "mean" normaliser.
        self.row_weight = self.kept
        if self.class_weight is not None:
            self.row_weight = self.kept * self.class_weight[self.index[:, 0]]
        self.denominator = self.row_weight.sum() if reduction == "mean" else None
        # Q_i, the mass of row i's target (1 for every row in the common case above).
        smoothing_mass = (self.eps / num_classes) * self.kept * self.total_class_weight
        self.mass = (1 - self.eps) * self.row_weight + smoothing_mass

    def logit_sums(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """``sum_c w_c x_ic`` of every row of ``logits`` ``(B, C)`` (only needed with label smoothing)."""
        if self.class_weight is None:
            torch.sum(logits, 1, dtype=out.dtype, out=out)
        else:
            out.copy_(logits.to(out.dtype) @ self.class_weight)

    def losses(
        self, lse: torch.Tensor, target_logits: torch.Tensor, logit_sums: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-size losses ``(G,)`` from each row's log-normaliser, target logit and, with label
        smoothing, ``logit_sums``; all ``(G, B)``."""
        rows = (1 - self.eps) * self.row_weight * (lse - target_logits.to(lse.dtype))
        if self.eps > 0:
            smooth = lse * self.total_class_weight - logit_sums  # -sum_c w_c log P_c
            rows = rows + (self.eps / self.num_classes) * self.kept * smooth
        total = rows.sum(1)
        return total if self.denominator is None else total / self.denominator

    def to_logit_gradients(self, probs: torch.Tensor, row_sums: torch.Tensor | None = None) -> None:
        """Turn probabilities ``P`` ``(G, B, C)`` into the loss gradients ``Q * P - q`` in place; given
        ``row_sums`` ``(G, B)``, ``probs`` holds ``row_sums * P`` and becomes ``row_sums * (Q * P - q)``."""
        if not self.unit_mass:
            probs.mul_(self.mass.view(1, -1, 1))
        sizes, batch = probs.shape[:2]
        target_mass = -(1 - self.eps) * self.row_weight  # a number in the common case, else (B,)
        if isinstance(target_mass, float):
            target_mass = probs.new_full((1, 1, 1), target_mass)
        else:
            target_mass = target_mass.view(1, -1, 1)
        if row_sums is not None:
            target_mass = target_mass * row_sums.unsqueeze(2)
        probs.scatter_add_(2, self.index.expand(sizes, -1, -1), target_mass.expand(sizes, batch, 1))
        if self.eps > 0:
            weight = torch.ones_like(probs[0, 0]) if self.class_weight is None else self.class_weight
            smoothing = (self.eps / self.num_classes) * self.kept  # a number in the common case
            if row_sums is None:
                per_row = isinstance(smoothing, torch.Tensor)
                probs.sub_(torch.outer(smoothing, weight) if per_row else smoothing * weight)
            else:
                probs.addcmul_((smoothing * row_sums).unsqueeze(2), weight, value=-1)


def _reads_normaliser_off_the_target(device: torch.device) -> bool:
    """Whether the log-normalisers come from the target probabilities (CPU) or from two row maxima.

    Both are exact to rounding. Reading them off the target saves two passes over every size's
    ``(B, C)`` logits per step (benchmarks/head_loss.py, MRL-E against a plain head on the CPU), but needs
    a host-side check for underflowed rows, which on a GPU would make the host wait every step.
    """
    return host_reads.host_reads_are_free(device)


# From this many classes per row of the batch on, the CPU keeps each size's logits class-major, see
# :func:`_class_major`: MRL-E's (tied) head, then untied MRL's.
CLASS_MAJOR_MIN_CLASSES_PER_ROW = 16
CLASS_MAJOR_MIN_CLASSES_PER_ROW_UNTIED = 3.5


def _class_major(device: torch.device, classes: int, batch: int, efficient: bool) -> bool:
    """Whether each size's ``(B, C)`` logits (and later gradients) lie class-major in memory.

    On the CPU, with many classes, MKL runs the step's matmuls faster with the logits stored ``(C, B)``:
    the weight gradient ``G^T z`` then reads ``G`` with its batch dimension contiguous, where a
    batch-major ``G`` is repacked for every chunk, and the forward product is written faster that way.
    The softmax over the strided class dimension costs more (see :func:`_shifted_exp_into`), and with
    few classes per row of the batch the matmuls gain nothing or lose. benchmarks/head_loss.py's layout
    table measures both (``--batch`` for other batch sizes); its tables in benchmarks/README.md ("Head +
    loss") set the two thresholds:

    - MRL-E: class-major from 16 classes per row of the batch on.
    - Untied MRL issues twice MRL-E's matmul FLOPs per softmax, so the matmuls' gain outweighs the
      softmax's cost sooner: class-major from 3.5 classes per row on.

    GPUs keep ``(B, C)``: cuBLAS needs no repacking and their softmax wants the class dimension
    contiguous.
    """
    per_row = CLASS_MAJOR_MIN_CLASSES_PER_ROW if efficient else CLASS_MAJOR_MIN_CLASSES_PER_ROW_UNTIED
    return device.type == "cpu" and classes >= per_row * batch


# Up to this many classes, the CPU's batch-major logits are turned into losses with one pass per operation
# over every size's logits at once, see :func:`_all_sizes_at_once`.
ALL_SIZES_AT_ONCE_MAX_CLASSES = 32


def _all_sizes_at_once(device: torch.device, class_major: bool, classes: int) -> bool:
    """Whether the softmax passes run once over every size's logits after all the matmuls, instead of
    per size right after its matmul.

    With few classes, ``torch.softmax`` over short contiguous rows is slow on the CPU (its kernel
    vectorises along the row), and every per-size call adds its Python and dispatch cost; passes over
    the whole ``(G, B, C)`` buffer avoid both, and a buffer of short rows stays in cache between the
    matmuls and the passes. With more classes the per-size form, each size's softmax while its logits
    are in cache, is as fast or faster: ``benchmarks/head_loss.py
    --small-heads`` times both forms (benchmarks/README.md, "Head + loss"). GPUs keep the per-size form.
    """
    return device.type == "cpu" and not class_major and classes <= ALL_SIZES_AT_ONCE_MAX_CLASSES


def _log_normalisers(
    probs: torch.Tensor,
    target_logits: torch.Tensor,
    targets: CrossEntropyTargets,
    logit_at: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``lse = x_y - log P_y`` of every size and row ``(G, B)``, from the probabilities ``(G, B, C)``.

    Where ``P_y`` is below the smallest normal number (a confidently wrong row: the loss is then over
    87 in float32) it has lost its relative precision or underflowed to 0, so those rows use their
    largest probability instead, which is never below ``1/C``, and the logit of that class, recomputed
    by ``logit_at(size, rows, classes)`` as one dot product per row (their logits are gone: the buffer
    holds probabilities by now). That is rare, so its cost does not matter.
    """
    sizes = probs.shape[0]
    target_probs = probs.gather(2, targets.index.expand(sizes, -1, -1)).squeeze(2)
    lse = target_logits.to(probs.dtype) - target_probs.log()
    underflowed = target_probs < torch.finfo(probs.dtype).tiny
    if bool(underflowed.any()):
        for g in underflowed.any(1).nonzero()[:, 0].tolist():
            rows = underflowed[g].nonzero()[:, 0]
            top_probs, classes = probs[g, rows].max(1)
            lse[g, rows] = logit_at(g, rows, classes) - top_probs.log()
    return lse


def _logit_at(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nesting: Sequence[int],
    efficient: bool,
    dtype: torch.dtype,
) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logit_at(g, rows, classes)``: size ``g``'s logit of ``classes[i]`` for row ``rows[i]``, with
    ``weight``/``bias`` laid out as :class:`~mrl.nn.matryoshka_linear.MatryoshkaLinear`'s. Computed in
    ``dtype`` (the softmax's), so a bf16 head's logit is not rounded to bf16 a second time."""

    def logit_at(g: int, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        m = nesting[g]
        offset = 0 if efficient else sum(nesting[:g])
        logits = (z[rows, :m].to(dtype) * weight[classes, offset : offset + m].to(dtype)).sum(1)
        if bias is not None:
            logits = logits + (bias[classes] if efficient else bias[g, classes]).to(dtype)
        return logits

    return logit_at


def _matmul_operands(z, weight, nesting, efficient) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per size, the features and the transposed weight block its logits are computed from: MRL-E adds
    each chunk of features to a running sum (one block per chunk), untied MRL multiplies each prefix by
    its own classifier."""
    if efficient:
        widths = [e - s for s, e in chunk_bounds(nesting)]
        inputs = z.split([*widths, z.shape[1] - nesting[-1]], 1)  # features past the largest size unused
    else:
        widths = list(nesting)
        inputs = [z[:, :m] for m in nesting]
    return list(inputs), [w.t() for w in weight.split(widths, 1)]


def _size_logits(g, efficient, slots, scratch, inputs, blocks, bias) -> torch.Tensor:
    """Size ``g``'s logits, written into its slot (MRL-E: the running sum in the last slot) or into the
    full-precision ``scratch`` buffer when the slots hold a lower precision."""
    if efficient:
        logits = slots[-1] if scratch is None else scratch
        if g > 0:
            logits.addmm_(inputs[g], blocks[g])
        elif bias is None:
            torch.mm(inputs[0], blocks[0], out=logits)
        else:
            torch.addmm(bias, inputs[0], blocks[0], out=logits)
        return logits
    logits = slots[g] if scratch is None else scratch
    if bias is None:
        torch.mm(inputs[g], blocks[g], out=logits)
    else:
        torch.addmm(bias[g], inputs[g], blocks[g], out=logits)
    return logits


def _losses_of_all_sizes(
    work: torch.Tensor,
    scratch: torch.Tensor | None,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nesting: Sequence[int],
    efficient: bool,
    targets: CrossEntropyTargets,
    predict: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`all_sizes_losses` of every size's logits, written into the batch-major ``work`` ``(G, B, C)``
    first (see :func:`_all_sizes_at_once`)."""
    slots = work.unbind(0)
    inputs, blocks = _matmul_operands(z, weight, nesting, efficient)
    for g in range(len(nesting)):
        logits = _size_logits(g, efficient, slots, scratch, inputs, blocks, bias)
        if logits is not slots[g]:  # MRL-E's running sum, or low-precision logits: kept in slot g
            slots[g].copy_(logits)
    return all_sizes_losses(work, targets, predict)


def all_sizes_losses(
    work: torch.Tensor, targets: CrossEntropyTargets, predict: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-size losses ``(G,)``, top-1 classes ``(G, B)`` (with ``predict``) and each row's sum of shifted
    exponentials ``(G, B)`` of every size's logits ``work`` ``(G, B, C)`` (any strides), with one pass per
    operation over all of them. ``work`` is left holding ``exp(logits - row max)``, the softmax
    unnormalised, as :func:`_shifted_exp_into` leaves it."""
    # One reduction gives the row maxima and, for predictions, their classes (the first largest, as argmax).
    maxes, predictions = work.max(2) if predict else (work.amax(2), None)
    target_logits = work.gather(2, targets.index.expand(work.shape[0], -1, -1)).squeeze(2)
    logit_sums = None
    if targets.eps > 0:
        logit_sums = work.sum(2) if targets.class_weight is None else work @ targets.class_weight
    exp_sums = work.sub_(maxes.unsqueeze(2)).exp_().sum(2)
    lse = maxes + exp_sums.log()
    return targets.losses(lse, target_logits, logit_sums), predictions, exp_sums


class _MatryoshkaCrossEntropy(torch.autograd.Function):
    """Per-size losses ``(G,)`` (and optionally top-1 predictions ``(G, B)``) from ``z`` directly."""

    @staticmethod
    def forward(ctx, z, weight, bias, nesting, efficient, targets, predict, needs_grad):
        sizes, batch, classes = len(nesting), z.shape[0], weight.shape[0]
        # Low-precision logits (autocast) get a float32 softmax, as autocast gives cross_entropy; the
        # matmuls write into a (B, C) buffer of their own dtype then.
        dtype = z.dtype if z.dtype in _FULL_PRECISION else torch.float32
        class_major = _class_major(z.device, classes, batch, efficient)
        work = _take_buffer((sizes, batch, classes), z.new_empty(0, dtype=dtype), class_major)
        scratch = None if dtype == z.dtype else _take_buffer((batch, classes), z, class_major)
        node_inputs = (z, weight, bias, nesting, efficient, targets)
        if _all_sizes_at_once(z.device, class_major, classes):
            losses, predictions, exp_sums = _losses_of_all_sizes(work, scratch, *node_inputs, predict)
            if scratch is not None:
                _give_back(scratch)
            return _MatryoshkaCrossEntropy._finish(
                ctx, work, exp_sums, losses, predictions, node_inputs, needs_grad
            )
        predictions = z.new_empty((sizes, batch), dtype=torch.long) if predict else None
        # Per size and row: the target logit (and the logit sum for label smoothing) and what the row's
        # log-normaliser comes from, one of three ways: class-major, the largest logit and the sum of the
        # shifted exponentials (see _shifted_exp_into); else, on the CPU, the target's probability (see
        # _log_normalisers); else the largest logit and largest probability. The losses follow from
        # these after the loop, for all sizes at once.
        off_the_target = not class_major and _reads_normaliser_off_the_target(z.device)
        row_maxima = not class_major and not off_the_target
        target_logits = z.new_empty((sizes, batch))
        maxes = work.new_empty((sizes, batch)) if class_major else None
        exp_sums = work.new_empty((sizes, batch)) if class_major else None
        if row_maxima:
            maxes, top_probs = z.new_empty((sizes, batch)), work.new_empty((sizes, batch))
        logit_sums = work.new_empty((sizes, batch)) if targets.eps > 0 else None
        # Each size's logits become probabilities while they are still in cache. MRL-E keeps its running
        # prefix sum in the last size's slot (the largest size's logits are that sum); untied MRL writes
        # each size's logits into its own slot. The softmax is written in place where dtypes allow.
        # Views are made once up front: on small heads the per-call Python cost is what dominates.
        slots, target_rows = work.unbind(0), target_logits.unsqueeze(2).unbind(0)
        max_rows = None if maxes is None else maxes.unbind(0)
        exp_rows = None if exp_sums is None else exp_sums.unbind(0)
        top_rows = top_probs.unbind(0) if row_maxima else None
        pred_rows = predictions.unbind(0) if predict else None
        sum_rows = logit_sums.unbind(0) if logit_sums is not None else None
        inputs, blocks = _matmul_operands(z, weight, nesting, efficient)
        for g in range(sizes):
            logits = _size_logits(g, efficient, slots, scratch, inputs, blocks, bias)
            if pred_rows is not None:
                torch.argmax(logits, 1, out=pred_rows[g])
            if row_maxima:
                torch.amax(logits, 1, out=max_rows[g])
            torch.gather(logits, 1, targets.index, out=target_rows[g])
            if sum_rows is not None:
                targets.logit_sums(logits, out=sum_rows[g])
            if class_major:
                _shifted_exp_into(logits, slots[g], max_rows[g], exp_rows[g])
            else:
                torch.softmax(logits, 1, dtype=dtype, out=slots[g])
            if row_maxima:
                torch.amax(slots[g], 1, out=top_rows[g])
        if class_major:
            # The largest shifted exponential is exp(0) = 1, so each sum is at least 1: exact to rounding.
            lse = maxes + exp_sums.log()
        elif off_the_target:
            logit_at = _logit_at(z, weight, bias, nesting, efficient, dtype)
            lse = _log_normalisers(work, target_logits, targets, logit_at)
        else:
            # The largest probability is exp(max - lse), never below 1/C, so this is exact to rounding.
            lse = maxes.to(dtype) - top_probs.log()
        losses = targets.losses(lse, target_logits, logit_sums)
        if scratch is not None:
            _give_back(scratch)
        return _MatryoshkaCrossEntropy._finish(
            ctx, work, exp_sums, losses, predictions, node_inputs, needs_grad
        )

    @staticmethod
    def _finish(ctx, work, exp_sums, losses, predictions, node_inputs, needs_grad):
        """What forward returns; with ``needs_grad``, ``work`` turned into the logit gradients (up to
        backward's per-size scale) and kept for backward."""
        if not needs_grad:
            _give_back(work)
            return losses if predictions is None else (losses, predictions)
        z, weight, bias, nesting, efficient, targets = node_inputs
        # Scaled by each size's upstream gradient (and, given exp_sums, each row's 1 / exp_sum) in backward.
        targets.to_logit_gradients(work, exp_sums)
        ctx.save_for_backward(z, weight)
        ctx.exp_sums = exp_sums
        ctx.probs, ctx.targets, ctx.nesting, ctx.efficient = work, targets, nesting, efficient
        ctx.has_bias = bias is not None
        if predictions is None:
            return losses
        ctx.mark_non_differentiable(predictions)
        return losses, predictions

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, *_):
        z, weight = ctx.saved_tensors
        probs, targets, nesting = ctx.probs, ctx.targets, ctx.nesting
        if probs is None:
            raise RuntimeError(
                "The fused Matryoshka cross-entropy was back-propagated twice (retain_graph=True): its "
                "buffer is reused for the gradients. Build the head and loss with fused=False for this."
            )
        ctx.probs = None  # the buffer is reused as gradient storage below
        scale = logit_gradient_scale(grad_losses, targets, ctx.exp_sums, probs.dtype)
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = torch.zeros_like(z) if need_z else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = None
        # Gradients are formed in the buffer's dtype (float32 under autocast), matmuls run in z's.
        if ctx.efficient:
            slots, scales = probs.unbind(0), scale.unbind(0)
            acc = slots[-1].mul_(scales[-1])  # the suffix sum accumulates in the largest size's slot
            tied_backward_matmuls(acc, slots, scales, z, weight, nesting, grad_z, grad_w)
            if ctx.has_bias and need_b:
                grad_b = acc.sum(0)
        else:
            probs.mul_(scale)
            slots = probs.unbind(0) if probs.dtype == z.dtype else probs.to(z.dtype).unbind(0)
            untied_backward_matmuls(slots, z, weight, nesting, grad_z, grad_w)
            if ctx.has_bias and need_b:
                grad_b = probs.sum(1)
        _give_back(probs)
        if grad_b is not None and grad_b.dtype != weight.dtype:
            grad_b = grad_b.to(weight.dtype)
        return grad_z, grad_w, grad_b, None, None, None, None, None


def logit_gradient_scale(
    grad_losses: torch.Tensor, targets: CrossEntropyTargets, exp_sums: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """What the buffer left by :meth:`CrossEntropyTargets.to_logit_gradients` is multiplied by to hold the
    logit gradients: each size's upstream gradient (over the "mean" normaliser), and with ``exp_sums``
    ``(G, B)`` each row's ``1 / exp_sum``; shape ``(G, 1, 1)`` or ``(G, B, 1)``."""
    scale = grad_losses if grad_losses.dtype == dtype else grad_losses.to(dtype)
    if targets.denominator is not None:
        scale = scale / targets.denominator
    scale = scale.view(-1, 1, 1)
    if exp_sums is not None:  # the buffer holds exp_sum * (Q * P - q), see _shifted_exp_into
        scale = scale / exp_sums.unsqueeze(2)
    return scale


def matryoshka_cross_entropy(
    z: torch.Tensor,
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
    """Per-size cross-entropies ``(G,)`` of the head ``(weight, bias, nesting, efficient)`` on ``z``.

    Equal to ``F.cross_entropy`` of each size's logits; ``weight``/``bias`` laid out as
    :class:`~mrl.nn.matryoshka_linear.MatryoshkaLinear`'s. With ``predict=True`` also returns the top-1
    class of every size ``(G, B)``, for training accuracy without keeping the logits.
    """
    z, weight, bias, context = blas_inputs(z, weight, bias)
    targets = CrossEntropyTargets(
        target, weight.shape[0], z.dtype, class_weight, ignore_index, label_smoothing, reduction
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, weight, bias))
    with context:
        return _MatryoshkaCrossEntropy.apply(
            z, weight, bias, tuple(nesting), bool(efficient), targets, bool(predict), needs_grad
        )
