"""Matryoshka contrastive losses: supervised-contrastive (SupCon) and InfoNCE (SimCLR's NT-Xent) on every
prefix ``z[:, :m]`` of an embedding of several augmented views, each prefix L2-normalised after truncation.

For views ``z`` of shape ``(V * B, D)`` (view-major: rows ``v * B + i`` are the views of image ``i``) and a
size ``m``, the cosine similarities of the normalised prefixes divided by the temperature are the logits;
each row is an anchor, every other row a candidate (the anchor itself is left out), and the loss of an
anchor is minus the mean log-probability of its positives:

- ``infonce``: the positives are the other views of the same image (with two views: SimCLR's NT-Xent);
- ``supcon``: every other row of the same class (Khosla et al. 2020, the ``L_out`` form).

Under data parallelism (DDP) each process holds a part of the global batch. With ``gather`` (the
default) the candidates are every process's rows, gathered with their gradient, and each process's
anchors are its own rows: the local-loss form of open_clip (``gather_with_grad``, ``local_loss``). With
equal batches per process, the mean of the processes' losses is the loss of one process on the global
batch, and DDP's averaged gradients are its gradients, so N processes see all the negatives one would.
Without ``gather`` each process contrasts its own rows only (1/N of the negatives).

The loss of a size is the mean over anchors. :class:`MatryoshkaContrastiveLoss` is a per-size loss for
:class:`mrl.nn.matryoshka_loss.MatryoshkaLoss`, which weighs the sizes as ``sum_m c_m * loss_m``
(``head.weights``, and the size sampler's draw), the one place that weighs per-size losses, whatever the
objective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn

KINDS = ("supcon", "infonce")


def prefix_cosine_similarities(
    z: torch.Tensor, nesting: Sequence[int], eps: float = 1e-12, others: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarities of the L2-normalised prefixes ``z[:, :m]`` for every ``m`` in ``nesting``,
    shape ``(G, N, N)``; against the rows of ``others`` ``(M, D)`` instead of ``z``'s own: ``(G, N, M)``.
    :func:`prefix_cosines` stacked."""
    return torch.stack(list(prefix_cosines(z, nesting, eps, others)))


def prefix_cosines(
    z: torch.Tensor, nesting: Sequence[int], eps: float = 1e-12, others: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """The ``(N, N)`` (or ``(N, M)`` against ``others``) cosine similarities of the L2-normalised
    prefixes of each size of ``nesting`` in turn, for a loss computed size by size.

    Each size is one product of its normalised prefixes (the prefixes' squared norms are cumulative sums
    of squares, one pass over the features). Why not one ``N x M x D`` product of the feature blocks
    between consecutive sizes, summed cumulatively over the sizes and divided by the norms, as this
    function did before: that halves the products' work at power-of-two sizes, but adds passes over the
    whole ``(G, N, M)`` result (a cumulative sum, a division, their backward), and no size's matrix can
    be used and dropped before the next is made. On the CPU that made the adaptor's loss step at 256
    features 2.5x slower and the contrastive loss's 1.5x, and saved about a tenth of the contrastive
    loss at 2048 (benchmarks/adaptor_step.py; benchmarks/README.md, "Prefix-cosine losses").
    """
    sizes = [int(m) for m in nesting]
    index = torch.as_tensor(sizes, device=z.device) - 1

    def norms(x: torch.Tensor) -> torch.Tensor:  # (G, rows)
        # clamped before the square root, whose gradient at 0 is infinite (all-zero prefixes, e.g. of
        # ReLU features, would make every gradient NaN); the same values as F.normalize's eps otherwise
        return x.square().cumsum(1)[:, index].T.clamp_min(eps * eps).sqrt()

    mine = norms(z)
    theirs = None if others is None else norms(others)
    for g, m in enumerate(sizes):
        prefix = z[:, :m] / mine[g, :, None]
        other = prefix if others is None else others[:, :m] / theirs[g, :, None]
        yield prefix @ other.T


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _candidates(
    z: torch.Tensor, keys: torch.Tensor, batch: int, views: int, supervised: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(candidate rows, their keys, the first anchor's row among them)``: every process's rows,
    gathered rank by rank with their gradient (``torch.distributed.nn``: each process's rows get back the
    gradient every process's loss sends them), when several processes train; else the rows themselves.

    The keys are the labels (gathered) or the image ids, which are made unique across processes by
    offsetting each process's by ``rank * batch``, so the same image on two processes is never a pair.
    """
    rank, world = _world()
    if world == 1:
        return z, keys, 0
    # every process's batch has the same shape (a DistributedSampler gives each one as many items)
    rows = torch.cat(dist_nn.all_gather(z), 0)
    if supervised:
        gathered = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(gathered, keys)
        all_keys = torch.cat(gathered)
    else:
        image = torch.arange(batch, device=z.device).repeat(views)
        all_keys = torch.cat([image + r * batch for r in range(world)])
    return rows, all_keys, rank * z.shape[0]


def matryoshka_contrastive_per_size(
    z: torch.Tensor,
    nesting: Sequence[int],
    views: int,
    labels: torch.Tensor | None = None,
    temperature: float = 0.1,
    gather: bool = False,
) -> torch.Tensor:
    """The contrastive loss of every size, shape ``(G,)``, for view-major views ``z`` ``(views * B, D)``.

    With ``labels`` ``(B,)`` the positives are the same class (SupCon); without, the other views of the
    same image (InfoNCE). With at least two views every anchor has positives (its image's other views).
    ``gather``: under several processes, the candidates are every process's rows (module docstring).
    """
    n = z.shape[0]
    if views < 2 or n % views:
        raise ValueError(f"contrastive losses need >= 2 views of each image; got {n} rows for {views} views")
    batch = n // views
    image = torch.arange(batch, device=z.device).repeat(views)
    keys = image if labels is None else labels.to(z.device).repeat(views)
    rows, row_keys, first = _candidates(z, keys, batch, views, labels is not None) if gather else (z, keys, 0)
    # each anchor's own row among the candidates
    self_pairs = torch.zeros((n, rows.shape[0]), dtype=torch.bool, device=z.device)
    self_pairs[:, first : first + n] = torch.eye(n, dtype=torch.bool, device=z.device)
    keys = row_keys[first : first + n]
    positives = (keys[:, None] == row_keys[None, :]) & ~self_pairs
    others = None if rows is z else rows
    logits = prefix_cosine_similarities(z, nesting, others=others) / temperature  # (G, N, M)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=2, keepdim=True)
    # masked_fill, not multiply: the anchor's own -inf log-probability times 0 would be nan. No boolean
    # indexing: its result's size would have to be read back from the GPU every step.
    summed = log_prob.masked_fill(~positives, 0.0).sum(2)  # (G, N)
    return (-summed / positives.sum(1).to(z.dtype)).mean(1)


class MatryoshkaContrastiveLoss(nn.Module):
    """The ``kind`` contrastive loss ``L_m`` of the normalised prefixes of every size ``m`` (see the module
    docstring), to be weighed by a ``MatryoshkaLoss(per_size_loss=...)``.

    Holds no state, so a contrastive run's checkpoint has the same keys as a cross-entropy run's.
    """

    def __init__(
        self,
        nesting: Sequence[int],
        kind: str = "supcon",
        temperature: float = 0.1,
        views: int = 2,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown contrastive loss {kind!r}; one of {KINDS}")
        self.nesting = [int(m) for m in nesting]
        self.kind = kind
        self.temperature = float(temperature)
        self.views = int(views)
        self.gather = bool(gather)  # candidates from every process (module docstring)

    def check_views(self, x: torch.Tensor) -> None:
        """Refuse a training batch that is not ``views`` stacked views of its images ``(V, B, C, H, W)``."""
        if x.dim() != 5 or x.shape[0] != self.views:
            raise RuntimeError(
                f"objective={self.kind} needs {self.views} views per training batch (V, B, C, H, W), got a "
                f"batch of shape {tuple(x.shape)}: the datamodule was not given objective.views "
                "(datamodule.configure_views)"
            )

    def per_size(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of every size ``(G,)`` for view-major views ``z`` and labels ``(B,)``."""
        return matryoshka_contrastive_per_size(
            z,
            self.nesting,
            self.views,
            labels=labels if self.kind == "supcon" else None,
            temperature=self.temperature,
            gather=self.gather,
        )

    forward = per_size  # calling the loss gives the per-size losses too
