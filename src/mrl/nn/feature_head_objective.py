"""The per-size loss of a head trained on frozen features (CSR's sparse autoencoder, the
Matryoshka-Adaptor), in the form :class:`~mrl.nn.matryoshka_loss.MatryoshkaLoss` weighs."""

from __future__ import annotations

import torch
from torch import nn

from mrl.nn.adaptor import MatryoshkaAdaptor
from mrl.nn.sparse_autoencoder import SparseAutoencoder


class FeatureHeadObjective(nn.Module):
    """``per_size(features, target) -> (G,)``: the head's own losses of every size on the frozen
    ``features`` (its reconstruction and similarity terms; ``target`` for its supervised terms).

    The head is referenced, not registered: its weights belong to the model (the post-hoc backbone),
    so checkpoints hold them once. ``step`` is the training step, which CSR's k-annealing reads; the
    LightningModule sets it before each training batch.
    """

    def __init__(self, head: SparseAutoencoder | MatryoshkaAdaptor) -> None:
        super().__init__()
        self._head = [head]  # a list: not a submodule
        self.step: int | None = None

    @property
    def head(self) -> SparseAutoencoder | MatryoshkaAdaptor:
        return self._head[0]

    def per_size(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        head = self.head
        if isinstance(head, SparseAutoencoder):
            return head.per_size(features, target, step=self.step if head.training else None)
        return head.per_size(features, target)
