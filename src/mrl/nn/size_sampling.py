"""Random size sampling per training step: the full size plus ``k`` other sizes of the nesting list.

As sentence-transformers' ``MatryoshkaLoss(n_dims_per_step=...)`` and the 2DMSE paper: each step trains
a random subset of the sizes, so a step costs fewer loss terms' gradients and every size still gets
trained over many steps. Here the full size is always in the subset (the embedding every prefix is
cut from), the other ``k`` are drawn uniformly without replacement from the rest.

The draw is a function of ``(seed, step)`` only: a run, and a run resumed from a checkpoint (same global
step), trains the same sizes at the same steps, every DDP process draws the same sizes, and the micro-batches
of one optimizer step (gradient accumulation) share one draw. CPU and CUDA generators give different
draws for the same seed: the sequence is fixed per device type. It is drawn
by a generator on the losses' device and stays there: the step's weights are a device tensor, so no step
waits for the host (tests/training/test_no_host_sync.py).

Undrawn sizes are masked (weight 0), not skipped: the fused head and cross-entropy
(:mod:`mrl.nn.fused_cross_entropy`) compute every size in one node, and MRL-E's logits are prefix sums in
which each size builds on the smaller ones, so there is nothing to skip. For MRL's independent
classifiers skipping would save only the undrawn sizes' head matmuls, a small part of a step next to the
backbone, at the price of a host-side draw, a head graph whose shape changes every step, and train
metrics with gaps; masking keeps every size's train accuracy and loss measured on every batch.
"""

from __future__ import annotations

import numpy as np
import torch

from mrl.errors import MRLError


class SizeSampler:
    """Per-step weights ``(G,)``: 1 for the sizes trained this step, 0 for the others.

    ``num_sizes`` is ``G = len(nesting)`` (the last is the full size, always drawn), ``per_step`` the
    number ``k`` of other sizes drawn each step (``k >= G - 1``: every size, every step). Multiply the
    per-size losses by :meth:`step_weights` before weighting them by ``c_m``: a drawn size keeps its
    ``c_m``, an undrawn one contributes nothing that step.
    """

    def __init__(self, num_sizes: int, per_step: int, seed: int = 0) -> None:
        check_sizes_per_step(per_step, num_sizes)
        self.num_sizes = int(num_sizes)
        self.per_step = int(per_step)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._drawn: torch.Tensor | None = None  # how often each size was drawn since the last read
        self._steps = 0

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        # SeedSequence mixes (seed, step) into a well-spread 32-bit seed on the host; seeding a device
        # generator only sets its host-side state, so this costs no synchronisation.
        generator.manual_seed(int(np.random.SeedSequence(self.seed, spawn_key=(step,)).generate_state(1)[0]))
        return generator

    def step_weights(self, step: int, device: torch.device | str) -> torch.Tensor:
        """The 0/1 weights of every size at global step ``step``, a float32 tensor on ``device``."""
        device = torch.device(device)
        weights = torch.zeros(self.num_sizes, device=device)
        weights[-1] = 1.0
        others = self.num_sizes - 1
        if self.per_step >= others:
            weights.fill_(1.0)
        elif self.per_step > 0:
            # k smallest of G - 1 independent uniforms: a uniformly random k-subset, drawn on the device
            scores = torch.rand(others, device=device, generator=self._generator(device, step))
            weights.index_fill_(0, scores.topk(self.per_step, largest=False).indices, 1.0)
        self._drawn = weights.clone() if self._drawn is None else self._drawn + weights
        self._steps += 1
        return weights

    def drawn_fractions(self) -> torch.Tensor | None:
        """The fraction of the steps since the last call that trained each size ``(G,)`` (None when
        no step drew); resets the count. Read once per epoch, where the values are logged anyway."""
        if self._drawn is None:
            return None
        fractions = self._drawn / self._steps
        self._drawn, self._steps = None, 0
        return fractions


def check_sizes_per_step(per_step: object, num_sizes: int) -> None:
    """``head.sizes_per_step``: an integer from 0 to ``num_sizes - 1`` (the sizes besides the full one)."""
    ok = isinstance(per_step, int) and not isinstance(per_step, bool) and 0 <= per_step <= num_sizes - 1
    if not ok:
        raise MRLError(
            f"head.sizes_per_step={per_step!r} is not valid for a head of {num_sizes} size(s): it is the "
            f"number of sizes trained each step besides the full one, an integer from 0 to {num_sizes - 1}. "
            "Use e.g. head.sizes_per_step=2, or head.sizes_per_step=null to train every size every step."
        )
