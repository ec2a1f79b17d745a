"""The Matryoshka objective: ``sum_m c_m * s_m * L_m`` over the prefix sizes ``m`` of an embedding, the one
place that weighs sizes.

As sentence-transformers' ``MatryoshkaLoss``, one wrapper takes any per-size loss, the sizes' relative
importance ``c_m`` and an optional per-step size sampler (``s_m``: 1 for the sizes drawn this training
step, 0 for the others, :mod:`mrl.nn.size_sampling`; 1 for every size without a sampler and in
evaluation). A per-size loss is any object with a ``per_size(*inputs)`` method returning the unweighted
loss of every size, a tensor ``(G,)`` in nesting order (:class:`PerSizeLoss`); its inputs are its own
(logits and targets, views and labels, frozen features, ...). mrl's per-size losses:

- :class:`mrl.nn.cross_entropy.MatryoshkaCrossEntropy` (the default): a classifier head's cross-entropy
  per size, fused or per size;
- :class:`mrl.nn.matryoshka_contrastive.MatryoshkaContrastiveLoss`: SupCon or InfoNCE on the normalised
  prefixes of several views' embeddings.

A training loop with one loss per step calls ``loss(*inputs, step=global_step)``. mrl's LitModule weighs
several per-size losses with one draw per batch (the final head's, each depth stage's, the contrastive
one): it keeps their per-size values for its metrics, takes the batch's draw once with
:meth:`MatryoshkaLoss.draw` and sums each with :meth:`MatryoshkaLoss.combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.size_sampling import SizeSampler


class PerSizeLoss(Protocol):
    """What :class:`MatryoshkaLoss` wraps: the unweighted loss of every size of a nesting list."""

    def per_size(self, *inputs: Any) -> torch.Tensor:
        """The loss of every size, shape ``(G,)``, in nesting order (differentiable)."""
        ...


class MatryoshkaLoss(nn.Module):
    """``sum_g c_g * s_g * per_size_loss.per_size(*inputs)[g]``: the Matryoshka objective.

    ``weights`` are the relative importance ``c_m`` of each size (default 1 each, as the paper).
    ``per_size_loss`` is what is weighed (:class:`PerSizeLoss`); without one it is the cross-entropy
    :class:`~mrl.nn.cross_entropy.MatryoshkaCrossEntropy` built from ``fused`` and
    ``cross_entropy_kwargs`` (``label_smoothing``, ``ignore_index``, ``weight`` for per-class weights,
    ``reduction``), so ``MatryoshkaLoss(weights)(logits (G, B, C), target (B,))`` is
    ``sum_g c_g * CE(logits[g], target)``. ``sampler`` draws the sizes trained at each training step
    (:meth:`draw`), which :meth:`combine` applies.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        fused: bool = True,
        *,
        per_size_loss: PerSizeLoss | None = None,
        sampler: SizeSampler | None = None,
        **cross_entropy_kwargs,
    ) -> None:
        super().__init__()
        if per_size_loss is None:
            per_size_loss = MatryoshkaCrossEntropy(fused=fused, **cross_entropy_kwargs)
        elif cross_entropy_kwargs or not fused:
            raise ValueError(
                "MatryoshkaLoss: fused and cross-entropy settings configure its own cross-entropy; with a "
                "per_size_loss, configure that loss instead"
            )
        self.per_size_loss = per_size_loss
        self.sampler = sampler
        # A buffer follows the module (and so the losses) across devices with .to() / Lightning.
        self.register_buffer(
            "weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        )
        # Checkpoints name the cross-entropy's class weights "<prefix>class_weight", the key stored
        # checkpoints have, not "<prefix>per_size_loss.class_weight": saving and loading map the two.
        self.register_state_dict_post_hook(_class_weight_key_out)
        self.register_load_state_dict_pre_hook(_class_weight_key_in)

    def _size_weights(self, num_sizes: int, like: torch.Tensor) -> torch.Tensor:
        """The relative importance weights, one per size (:meth:`combine` sums without them when none
        are given)."""
        if self.weights.numel() != num_sizes:
            raise ValueError(
                f"MatryoshkaLoss has {self.weights.numel()} relative importance weights but the logits "
                f"have {num_sizes} sizes; give one weight per size in head.nesting."
            )
        return self.weights.to(device=like.device, dtype=like.dtype)

    def per_size(self, *inputs: Any) -> torch.Tensor:
        """The unweighted loss of every size ``(G,)`` (the wrapped per-size loss's)."""
        return self.per_size_loss.per_size(*inputs)

    def per_size_from_embedding(
        self, head: MatryoshkaLinear, z: torch.Tensor, target: torch.Tensor, predict: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-entropy only: the per-size losses of ``head`` on ``z`` (and top-1 predictions when
        ``predict``), head and loss as one node; see
        :meth:`~mrl.nn.cross_entropy.MatryoshkaCrossEntropy.per_size_from_embedding`."""
        return self.per_size_loss.per_size_from_embedding(head, z, target, predict=predict)

    def draw(self, step: int, device: torch.device | str) -> torch.Tensor | None:
        """The sizes trained at training step ``step``: the sampler's 0/1 weights ``(G,)``, a tensor on
        ``device`` (no host sync), or None without a sampler (every size). One draw per training batch,
        given to each :meth:`combine` of that batch (the sampler counts draws for its logged fractions)."""
        return None if self.sampler is None else self.sampler.step_weights(step, device)

    def combine(self, per_size: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_g c_g * s_g * per_size[g]`` with ``s`` a draw of :meth:`draw`, or 1 for every size when
        ``sizes`` is None (evaluation, or no sampler)."""
        if sizes is not None:
            per_size = per_size * sizes
        if self.weights is None:  # every weight 1: a plain sum, without a product node in the graph
            return per_size.sum()
        return (self._size_weights(per_size.shape[0], per_size) * per_size).sum()

    def forward(self, *inputs: Any, step: int | None = None) -> torch.Tensor:
        """The objective of ``inputs``: with a training ``step``, over that step's drawn sizes."""
        per_size = self.per_size(*inputs)
        return self.combine(per_size, None if step is None else self.draw(step, per_size.device))


def _class_weight_key_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = f"{prefix}per_size_loss.class_weight"
    if inner in state_dict:
        state_dict[f"{prefix}class_weight"] = state_dict.pop(inner)


def _class_weight_key_in(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    outer = f"{prefix}class_weight"
    if outer in state_dict and isinstance(module.per_size_loss, MatryoshkaCrossEntropy):
        state_dict[f"{prefix}per_size_loss.class_weight"] = state_dict.pop(outer)
