"""CSR's top-k sparse autoencoder on frozen features (Wen et al., ICML 2025, "Beyond Matryoshka:
Revisiting Sparse Coding for Adaptive Representation"), with CSRv2's k-annealing and supervised
contrastive term, trained at several k at once.

The model, as CSR's code and sentence-transformers' ``SparseAutoEncoder`` build it:

- ``pre = W (x - b_pre) + b_lat``: a pre-encoder bias ``b_pre`` (zeros), an encoder ``W`` of shape
  ``(hidden, in_features)`` with ``hidden = expansion * in_features`` (``nn.Linear``'s default
  initialisation) and a latent bias ``b_lat`` (zeros);
- the code of size ``k``: the ``k`` largest pre-activations of each row kept, every other unit set to 0,
  then ReLU (at most ``k`` non-zeros per row, fewer where a kept pre-activation is negative);
- ``decode(z) = z W + b_pre``: the decoder is tied, the encoder's transpose, with no normalisation of
  its columns (CSR's choice; OpenAI's top-k autoencoder unties and normalises them instead). On the
  CPU, training decodes a narrow code as the sum of its ``k`` active rows of ``W``
  (``F.embedding_bag``), and a wide one as a product with the dense ``(B, hidden)`` code, whichever
  costs less (``sparse_decodes``).

Training loss of one size ``k`` (CSR's ``main_visual.py`` with ``topk = k``):

``L_k = mse(decode(z_k), x) + wide_weight * mse(decode(z_{4k}), x) + aux_weight * L_aux + c * L_con``

- the wide term reconstructs from the ``wide_factor * k`` largest units (capped at ``hidden``);
- ``L_aux`` (auxiliary-k, Gao et al. 2024): the ``aux_k`` largest pre-activations among *dead* units
  decode the residual ``x - decode(z_k)`` (detached), as a mean squared error normalised by the
  residual's variance over the batch (0 for a batch whose residual has none, e.g. one row). A unit is
  dead after ``dead_steps`` training steps in which it was active in no row of any code the step
  computed (the widest is the ``wide_factor * k_max`` code, which holds every smaller one: top-k sets
  are nested). CSR counts forward calls (two or three a step), this counts steps;
- ``L_con``, optional: ``instance`` is CSR's in-batch contrastive loss on the L2-normalised codes (its
  two copies of each batch are computed from the same input and so are equal, which makes it a
  repulsion of different rows; see :func:`code_contrastive_loss`), ``label`` is CSRv2's supervised form
  (rows of the same class are positives).

k-annealing (CSRv2): with ``k_start`` set, a size ``k`` trains at step ``t`` with
``round(k_start * (1 - p) + k * p)`` units, ``p = min(t / k_anneal_steps, 1)``, so every size starts from
the same wide code and narrows to its own ``k``. Evaluation and :meth:`SparseAutoencoder.encode` always
use the requested ``k``.

Protocol for a Matryoshka objective: the sizes of this head are its ``k`` values;
:meth:`SparseAutoencoder.per_size` returns one loss per size, shape ``(G,)``, in the order of ``sizes``,
which the objective weighs (``sum_g c_g * loss_g``, with any per-step size mask) exactly as it weighs
cross-entropy per prefix. With one size and unit weight it is CSR's loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mrl.errors import MRLError
from mrl.nn.nesting import validate_nesting

CONTRASTIVE = ("none", "instance", "label")


def top_k_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The size-``k`` code of pre-activations ``pre`` ``(B, H)``: the ``k`` largest of each row, ReLU'd,
    zeros elsewhere."""
    values, indices = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, indices, F.relu(values))


def normalized_mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mse(reconstruction, target) / mse(mean(target), target)``: the error relative to predicting the
    batch mean; 0 where the target does not vary over the batch (nothing to explain)."""
    spread = F.mse_loss(target.mean(0, keepdim=True).expand_as(target), target)
    varies = spread > 0
    return torch.where(varies, F.mse_loss(reconstruction, target) / torch.where(varies, spread, 1.0), 0.0)


def code_contrastive_loss(
    codes: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.2
) -> torch.Tensor:
    """CSR's in-batch contrastive loss of codes ``(B, H)`` (``labels``: CSRv2's supervised form).

    CSR stacks two copies of the batch's codes (``2B`` rows, L2-normalised) and scores each row ``i``
    by ``-log(pos_i / (pos_i + neg_i))`` with ``pos_i`` the sum of ``exp(cos / T)`` over its positives
    (its copy; with labels, every other row of its class) and ``neg_i`` over the other rows. The two
    copies being equal, a row meets its own code once (its copy) and every other code twice, which is
    what is computed here from one copy: the same value, half the rows.
    """
    z = F.normalize(codes, dim=1)
    logits = z @ z.T / temperature
    n = codes.shape[0]
    self_pairs = torch.eye(n, dtype=torch.bool, device=codes.device)
    positives = self_pairs if labels is None else labels[:, None] == labels[None, :]
    # each other row counts twice (both its copies), the row's own copy once
    logits = torch.where(self_pairs, logits, logits + math.log(2))
    everyone = logits.logsumexp(1)
    own = logits.masked_fill(~positives, float("-inf")).logsumexp(1)
    return (everyone - own).mean()


def annealed_k(step: int, start: int, end: int, steps: int) -> int:
    """CSRv2's linear k schedule: ``start`` at step 0, ``end`` from step ``steps`` on (rounded)."""
    if step >= steps:
        return int(end)
    progress = step / steps
    return round(start * (1 - progress) + end * progress)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    if any(int(k) < 1 for k in sizes):
        raise MRLError(
            f"The sparse autoencoder's k values (active units per code) must be at least 1, got "
            f"{list(sizes)}. Give positive k values, for example head.nesting=[8,16,32,64]."
        )
    return validate_nesting(sizes)


def _check_settings(in_features: int, expansion: float, sizes: list[int], k_start: int | None) -> int:
    if in_features < 1:
        raise MRLError(f"The sparse autoencoder needs at least one input feature, got {in_features}.")
    if expansion < 1:
        raise MRLError(
            f"The sparse autoencoder's expansion must be at least 1 (hidden width = expansion x input "
            f"width), got {expansion}. CSR uses 4: set head.expansion=4."
        )
    hidden = round(expansion * in_features)
    if sizes[-1] > hidden:
        raise MRLError(
            f"The sparse autoencoder's k values go up to {sizes[-1]} but its hidden layer has only {hidden} "
            f"units ({expansion} x {in_features} input features). Use k values of at most {hidden}, or a "
            f"larger expansion (at least {sizes[-1] / in_features:g})."
        )
    if k_start is not None and not sizes[-1] <= k_start <= hidden:
        raise MRLError(
            f"k-annealing starts from k_start={k_start}, which must lie between the largest k "
            f"({sizes[-1]}) and the hidden width ({hidden}). Pick a k_start in that range, or set "
            "k_start=null to train every size at its own k from the first step."
        )
    return hidden


class SparseAutoencoder(nn.Module):
    """CSR's top-k sparse autoencoder (see the module docstring) trained at the k values ``sizes``.

    ``encode(x, k)`` gives the size-``k`` code (a dense ``(B, hidden)`` tensor with at most ``k``
    non-zeros per row), ``per_size(features, target)`` the training loss of every size ``(G,)``,
    ``dead_fraction()`` the fraction of units dead by the auxiliary-k rule.
    """

    def __init__(
        self,
        in_features: int,
        sizes: Sequence[int],
        expansion: float = 4,
        aux_k: int = 512,
        aux_weight: float = 1 / 32,
        dead_steps: int = 30,
        wide_factor: int = 4,
        wide_weight: float = 1 / 8,
        contrastive: str = "none",
        contrastive_weight: float = 0.1,
        temperature: float = 0.2,
        k_start: int | None = None,
        k_anneal_steps: int = 0,
    ) -> None:
        super().__init__()
        self.sizes = _check_sizes(sizes)
        self.hidden = _check_settings(in_features, expansion, self.sizes, k_start)
        if contrastive not in CONTRASTIVE:
            raise MRLError(f"The contrastive term must be one of {CONTRASTIVE}, got {contrastive!r}.")
        if k_start is not None and k_anneal_steps < 1:
            raise MRLError(f"k-annealing needs k_anneal_steps >= 1 (got {k_anneal_steps}) with k_start set.")
        self.in_features = int(in_features)
        self.pre_bias = nn.Parameter(torch.zeros(in_features))
        self.encoder = nn.Linear(in_features, self.hidden, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(self.hidden))
        # training steps since each unit was last active: the dead-unit rule of the auxiliary-k loss
        self.register_buffer("steps_since_active", torch.zeros(self.hidden, dtype=torch.long))
        self.aux_k = min(int(aux_k), self.hidden)  # a smaller hidden layer offers all its units
        self.aux_weight, self.dead_steps = float(aux_weight), int(dead_steps)
        self.wide_factor, self.wide_weight = int(wide_factor), float(wide_weight)
        self.contrastive, self.contrastive_weight = contrastive, float(contrastive_weight)
        self.temperature = float(temperature)
        self.k_start, self.k_anneal_steps = k_start, int(k_anneal_steps)
        # Decode codes as sums of their active decoder rows (True) or as products of the dense codes
        # (False); None: on the CPU, sums where they cost less (_sums_pay_off), else products. On a GPU
        # the products run on tensor cores; the sums are not measured there (csr_step.py --device cuda).
        self.sparse_decodes: bool | None = None

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W (x - b_pre) + b_lat``, shape ``(B, hidden)``."""
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)

    def check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.hidden:
            raise MRLError(
                f"A sparse code keeps between 1 and {self.hidden} (the hidden width) active units; "
                f"k={k} was asked for. Pick k in that range, e.g. one of the trained sizes {self.sizes}."
            )
        return int(k)

    def encode(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The size-``k`` sparse code of ``x`` ``(B, in_features)``: ``(B, hidden)``, at most ``k``
        non-zeros per row."""
        return top_k_code(self.pre_activations(x), self.check_k(k))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``code W + b_pre`` of a code ``(B, hidden)``, shape ``(B, in_features)``."""
        return code @ self.encoder.weight + self.pre_bias

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The code at ``k`` (default: the largest size)."""
        return self.encode(x, self.sizes[-1] if k is None else k)

    def trained_sizes(self, step: int | None = None) -> list[int]:
        """The number of active units each size trains with at ``step`` (its ``k`` once annealed)."""
        if self.k_start is None or step is None:
            return list(self.sizes)
        return [annealed_k(step, self.k_start, k, self.k_anneal_steps) for k in self.sizes]

    def dead(self) -> torch.Tensor:
        """The units dead by the auxiliary-k rule, a ``(hidden,)`` boolean tensor."""
        return self.steps_since_active >= self.dead_steps

    def dead_fraction(self) -> torch.Tensor:
        """The fraction of dead units, a 0-d float tensor on the module's device (no host read)."""
        return self.dead().float().mean()

    def decode_sparse(self, values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of the code whose row ``b`` holds ``values[b]`` at ``units[b]`` (both
        ``(B, c)``). With sums (:meth:`_sums`) the sum of ``c`` decoder rows per row,
        ``B * c * in_features`` products instead of the dense code's ``B * hidden * in_features`` (as
        OpenAI's top-k autoencoder decodes on a GPU, with a kernel of its own); else the dense code's
        product."""
        if not self._sums(values, units.shape[1]):
            return self._decode_dense(values, units)
        return _row_sums(self.encoder.weight, values, units) + self.pre_bias

    def _decode_dense(self, values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of the dense ``(B, hidden)`` code holding ``values`` at ``units``."""
        return self.decode(_dense(values, units, (units.shape[0], self.hidden)))

    def _sums(self, values: torch.Tensor, units: int, decodes: int = 1) -> bool:
        """Whether to decode ``decodes`` codes that read ``units`` decoder rows per row of the batch in
        all (one bag call: :meth:`decode_sparse`, :meth:`_decode_prefixes`) as sums of those rows."""
        if self.sparse_decodes is not None:
            return self.sparse_decodes
        return values.is_cpu and _sums_pay_off(units, decodes, self.hidden)

    def _decode_prefixes(
        self, values: torch.Tensor, units: torch.Tensor, cutoffs: list[int]
    ) -> list[torch.Tensor]:
        """The decodings of the codes made of each row's first ``c`` units, for every ``c`` in ``cutoffs``
        (ascending, at most ``units.shape[1]``), from one sparse decode: the segments between cutoffs are
        decoded as bags and summed cumulatively, as the codes are nested (``B * cutoffs[-1]`` rows read)."""
        if not self._sums(values, cutoffs[-1], len(cutoffs)):
            return [self._decode_dense(values[:, :c], units[:, :c]) for c in cutoffs]
        rows, width = units.shape[0], cutoffs[-1]
        starts = torch.tensor([0, *cutoffs[:-1]], device=units.device)
        offsets = (torch.arange(rows, device=units.device)[:, None] * width + starts).flatten()
        flat = (values[:, :width].flatten(), units[:, :width].flatten())
        segments = _row_sums(self.encoder.weight, *flat, offsets).view(rows, len(cutoffs), -1)
        return list((segments.cumsum(1) + self.pre_bias).unbind(1))

    def _decode_cutoffs(
        self, pre: torch.Tensor, cutoffs: list[int], largest_k: int, dense_codes: set[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
        """For every cutoff ``c`` in ``cutoffs`` (ascending), the decoding of the size-``c`` code;
        the units active in the widest code (``(hidden,)`` booleans); the dense codes of ``dense_codes``.

        The codes up to the largest trained ``k`` are prefixes of one sorted top-k of that ``k``; a wider
        code (the wide terms) is one unsorted top-k (a sorted top-k as wide as the hidden layer costs more
        than the decodes on a CPU), or every unit's ReLU when it spans the hidden layer. Same sets and
        gradients as decoding each dense code.
        """
        top, units = pre.topk(largest_k, dim=1)
        top = F.relu(top)
        nested = [c for c in cutoffs if c <= largest_k]
        decoded = dict(zip(nested, self._decode_prefixes(top, units, nested), strict=True))
        codes = {c: (top[:, :c], units[:, :c]) for c in nested}
        for c in cutoffs[len(nested) :]:
            if c >= self.hidden:
                decoded[c] = self.decode(F.relu(pre))
                codes[c] = (F.relu(pre), None)
            else:
                wide, wide_units = pre.topk(c, dim=1, sorted=False)
                codes[c] = (F.relu(wide), wide_units)
                decoded[c] = self.decode_sparse(*codes[c])
        values, where = codes[cutoffs[-1]]
        fired = (values > 0).any(0) if where is None else _units_with_positive(values, where, self.hidden)
        dense = {c: _dense(*codes[c], pre.shape) for c in dense_codes}
        return decoded, fired, dense

    def _aux_reconstruction(self, pre: torch.Tensor) -> torch.Tensor:
        """The decoding of the ``aux_k`` largest pre-activations among dead units (CSR's ``auxk``)."""
        masked = pre.masked_fill(~self.dead(), 0.0)
        if self.aux_k >= self.hidden:
            return self.decode(F.relu(masked))
        values, units = masked.topk(self.aux_k, dim=1, sorted=False)
        return self.decode_sparse(F.relu(values), units)

    def per_size(
        self, features: torch.Tensor, target: torch.Tensor | None = None, step: int | None = None
    ) -> torch.Tensor:
        """The loss of every size ``(G,)`` on frozen ``features`` ``(B, in_features)``.

        ``target``: class labels ``(B,)``, read only by the ``label`` contrastive term; ``step``: the
        global step, read only by k-annealing. In training mode the dead-unit counts advance one step.
        """
        if self.contrastive == "label" and target is None:
            raise ValueError("the label contrastive term needs the batch's labels as target")
        ks = self.trained_sizes(step if self.training else None)
        pre = self.pre_activations(features)
        wides = [min(self.wide_factor * k, self.hidden) for k in ks]
        # a code shared by two terms (k=32 and the wide term of k=8) is decoded once
        reconstructions, fired, codes = self._decode_cutoffs(
            pre, sorted(set(ks) | set(wides)), max(ks), set(ks) if self.contrastive != "none" else set()
        )
        if self.training:  # the widest code holds every other one (top-k sets are nested)
            with torch.no_grad():
                self.steps_since_active.add_(1).masked_fill_(fired, 0)
        aux = self._aux_reconstruction(pre) if self.aux_weight and self.aux_k else None
        losses = []
        for k, wide in zip(ks, wides, strict=True):
            reconstruction = reconstructions[k]
            loss = F.mse_loss(reconstruction, features)
            loss = loss + self.wide_weight * F.mse_loss(reconstructions[wide], features)
            if aux is not None:
                residual = features - reconstruction.detach() + self.pre_bias.detach()
                loss = loss + self.aux_weight * normalized_mse(aux, residual)
            if self.contrastive != "none":
                labels = target if self.contrastive == "label" else None
                loss = loss + self.contrastive_weight * code_contrastive_loss(
                    codes[k], labels, self.temperature
                )
            losses.append(loss)
        return torch.stack(losses)


# On a CPU, what one decoder row summed per row of the batch costs in a training step (forward and
# backward), in rows of a dense product's: embedding_bag's backward scatters row by row, while the
# product runs at matmul speed over every unit. benchmarks/csr_step.py times the three rules (sums,
# dense products, this mix); benchmarks/README.md, "CSR's loss step".
SUM_ROW_COST = 6


def _sums_pay_off(units: int, decodes: int, hidden: int) -> bool:
    """Whether summing ``units`` rows per row of the batch costs less than ``decodes`` dense products
    over all ``hidden`` units: the nested codes' one bag call against a product per code, a single wide
    code against one product."""
    return units * SUM_ROW_COST <= decodes * hidden


def _row_sums(
    weight: torch.Tensor, values: torch.Tensor, units: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Bags of decoder rows, each row ``weight[u]`` times its value: ``(B, c)`` values and units give one
    bag per row; flat ones with ``offsets``, one bag per offset."""
    return F.embedding_bag(units, weight, offsets, mode="sum", per_sample_weights=values.to(weight.dtype))


def _units_with_positive(values: torch.Tensor, units: torch.Tensor, hidden: int) -> torch.Tensor:
    """``(hidden,)`` booleans: the units that hold a positive value in some row (no host sync)."""
    counts = torch.zeros(hidden, device=values.device).index_add_(
        0, units.flatten(), (values > 0).flatten().float()
    )
    return counts > 0


def _dense(values: torch.Tensor, units: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """The ``(B, hidden)`` code of sparse ``values`` at ``units`` (``units=None``: already dense)."""
    if units is None:
        return values
    return values.new_zeros(tuple(shape)).scatter(1, units, values)
