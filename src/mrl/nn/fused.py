"""Fused Matryoshka heads: every size's logits (and gradients) from one autograd node.

Autograd over the per-size formulation stacks G logit tensors and, in backward, gives every weight
slice a zero-filled gradient of the whole weight matrix before summing them (G full-size buffers).
These functions write each size's logits and each weight block's gradient straight into one buffer
with BLAS ``out=``/``addmm_`` calls on strided views, so the only work left is the matmuls themselves.
The remaining Python loop issues G matmuls; the untied head's FLOPs are those of the per-size code
(benchmarks/head_loss.py compares them; benchmarks/README.md, "Head + loss").
Training fuses further, head and cross-entropy in one node: :mod:`mrl.nn.fused_cross_entropy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

# MKL's gemm is slower for outputs narrower than this than for this width itself, e.g. the 8-column
# backward products of MRL-E's first chunk (benchmarks/head_loss.py's "narrow" table, direct against
# windowed; benchmarks/README.md, "Head + loss"). A narrow product is therefore computed through a window
# of this many adjacent columns and the wanted columns copied out.
MIN_GEMM_WIDTH = 16


def mm_columns(
    a: torch.Tensor, m: torch.Tensor, start: int, stop: int, out: torch.Tensor, accumulate: bool = False
) -> None:
    """``out (+)= a @ m[:, start:stop]``, through a :data:`MIN_GEMM_WIDTH`-column window when narrow."""
    width, total = stop - start, m.shape[1]
    if width >= MIN_GEMM_WIDTH or total < MIN_GEMM_WIDTH:
        if accumulate:
            out.addmm_(a, m[:, start:stop])
        else:
            torch.mm(a, m[:, start:stop], out=out)
        return
    lo = min(start, total - MIN_GEMM_WIDTH)
    part = (a @ m[:, lo : lo + MIN_GEMM_WIDTH])[:, start - lo : stop - lo]
    if accumulate:
        out.add_(part)
    else:
        out.copy_(part)


def chunk_bounds(nesting: Sequence[int]) -> list[tuple[int, int]]:
    """The feature chunks ``[start, stop)`` between consecutive sizes: MRL-E's unit of work."""
    starts = [0, *nesting[:-1]]
    return list(zip(starts, nesting, strict=True))


def tied_backward_matmuls(
    acc: torch.Tensor,
    grads: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor] | None,
    z: torch.Tensor,
    weight: torch.Tensor,
    nesting: Sequence[int],
    grad_z: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> torch.Tensor:
    """MRL-E's input and weight gradients, written into ``grad_z``/``grad_w`` column chunk by chunk.

    Chunk ``k`` feeds every size ``g >= k``, so its logit gradient is the suffix sum of the per-size
    logit gradients ``grads[g]`` (times ``scales[g]`` when given). ``acc`` holds the last size's term on
    entry and is accumulated in place; it is returned holding the sum over all sizes (the bias gradient's
    rows). Matmuls run in ``z``'s dtype.
    """
    for g, (start, stop) in reversed(list(enumerate(chunk_bounds(nesting)))):
        if g < len(nesting) - 1:
            if scales is None:
                acc.add_(grads[g])
            else:
                acc.addcmul_(grads[g], scales[g])
        a = acc if acc.dtype == z.dtype else acc.to(z.dtype)
        if grad_z is not None:
            mm_columns(a, weight, start, stop, out=grad_z[:, start:stop])
        if grad_w is not None:
            mm_columns(a.t(), z, start, stop, out=grad_w[:, start:stop])
    return acc


def untied_backward_matmuls(
    grads: Sequence[torch.Tensor],
    z: torch.Tensor,
    weight: torch.Tensor,
    nesting: Sequence[int],
    grad_z: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> None:
    """MRL's input and weight gradients from each size's logit gradient ``grads[g]``: ``grad_z[:, :m]``
    accumulates, ``grad_w``'s column block of size ``g`` is written."""
    offset = 0
    for grad, m in zip(grads, nesting, strict=True):
        if grad_z is not None:
            mm_columns(grad, weight, offset, offset + m, out=grad_z[:, :m], accumulate=True)
        if grad_w is not None:
            mm_columns(grad.t(), z, 0, m, out=grad_w[:, offset : offset + m])
        offset += m


class _TiedHead(torch.autograd.Function):
    """MRL-E: ``logits[g] = z[:, :m_g] @ W[:, :m_g].T + b`` as prefix sums over chunk products."""

    @staticmethod
    def forward(ctx, z, weight, bias, nesting):
        bounds = chunk_bounds(nesting)
        out = z.new_empty(len(nesting), z.shape[0], weight.shape[0])
        for g, (s, e) in enumerate(bounds):
            chunk, w = z[:, s:e], weight[:, s:e].t()
            if g > 0:
                torch.addmm(out[g - 1], chunk, w, out=out[g])
            elif bias is not None:
                torch.addmm(bias, chunk, w, out=out[0])
            else:
                torch.mm(chunk, w, out=out[0])
        ctx.save_for_backward(z, weight)
        ctx.nesting, ctx.has_bias = nesting, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        acc = tied_backward_matmuls(
            grad_out[-1].clone(), grad_out.unbind(0), None, z, weight, ctx.nesting, grad_z, grad_w
        )
        grad_b = acc.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_z, grad_w, grad_b, None


class _UntiedHead(torch.autograd.Function):
    """MRL: ``logits[g] = z[:, :m_g] @ W_g.T + b_g``, the ``W_g`` side by side in one matrix."""

    @staticmethod
    def forward(ctx, z, weight, bias, nesting):
        out = z.new_empty(len(nesting), z.shape[0], weight.shape[0])
        offset = 0
        for g, m in enumerate(nesting):
            w = weight[:, offset : offset + m].t()
            if bias is None:
                torch.mm(z[:, :m], w, out=out[g])
            else:
                torch.addmm(bias[g], z[:, :m], w, out=out[g])
            offset += m
        ctx.save_for_backward(z, weight)
        ctx.nesting, ctx.has_bias = nesting, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        untied_backward_matmuls(grad_out.unbind(0), z, weight, ctx.nesting, grad_z, grad_w)
        grad_b = grad_out.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_z, grad_w, grad_b, None


def blas_inputs(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, contextlib.AbstractContextManager]:
    """``z``, ``weight`` and ``bias`` in the dtype the fused matmuls run in, and the context to run them.

    BLAS ``out=`` calls are not autocast, so under autocast the inputs are cast once here to its dtype
    (gradients flow back through the casts) and the returned context turns autocast off; otherwise
    they are promoted to a common dtype and the context does nothing.
    """
    device = z.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(z.dtype, weight.dtype)
    if z.dtype != dtype or weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        z, weight = z.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return z, weight, bias, (torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext())


def fused_matryoshka_linear(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nesting: Sequence[int],
    efficient: bool,
) -> torch.Tensor:
    """Logits ``(G, B, C)`` of every size; ``weight``/``bias`` laid out as :class:`MatryoshkaLinear`'s."""
    z, weight, bias, context = blas_inputs(z, weight, bias)
    head = _TiedHead if efficient else _UntiedHead
    with context:
        return head.apply(z, weight, bias, tuple(nesting))
