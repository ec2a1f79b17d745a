"""Post-hoc models: a frozen source backbone and a light trained module on its pooled features.

``mrl-train source=...`` trains only the module (:class:`~mrl.models.spec.FeatureHead`) and the
Matryoshka head, from cached features; the model it saves is the whole chain, so ``mrl-eval`` and
``mrl.load`` run it on images like any other model: ``z = feature_head(source(x))``.

The feature heads:

- ``projection`` (``head=mrl|mrl_e|ff``): a linear map, or with ``hidden`` a ``Linear -> GELU ->
  Linear`` MLP, to a ``dim``-feature embedding that the Matryoshka head reads by prefixes;
- ``csr``: CSR's top-k sparse autoencoder (:mod:`mrl.nn.sparse_autoencoder`); ``z`` is the code of the
  largest ``k``, and the size-``k`` representation the code of the ``k`` largest units;
- ``adaptor``: the Matryoshka-Adaptor (:mod:`mrl.nn.adaptor`), ``z = x + f(x)`` read by prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mrl.errors import MRLError
from mrl.models.backbone import TimmBackbone
from mrl.models.spec import FeatureHead
from mrl.nn.adaptor import MatryoshkaAdaptor
from mrl.nn.sparse_autoencoder import SparseAutoencoder

# The settings each feature head takes (the `head` config node's keys beyond the head's own; the
# projection's come from the `features` node): the arguments of its module.
PROJECTION_KEYS = ("dim", "hidden")
CSR_KEYS = (
    "expansion",
    "aux_k",
    "aux_weight",
    "dead_steps",
    "wide_factor",
    "wide_weight",
    "contrastive",
    "contrastive_weight",
    "temperature",
    "k_start",
    "k_anneal_steps",
)
ADAPTOR_KEYS = (
    "hidden_features",
    "neighbours",
    "topk_weight",
    "pair_weight",
    "reconstruction_weight",
    "ranking_weight",
    "supervised",
)
SETTINGS_KEYS = {"projection": PROJECTION_KEYS, "csr": CSR_KEYS, "adaptor": ADAPTOR_KEYS}


class Projection(nn.Module):
    """A learned map of frozen features to an embedding: linear, or an MLP with ``hidden`` units."""

    def __init__(self, in_features: int, dim: int | None = None, hidden: int | None = None) -> None:
        super().__init__()
        out = int(in_features if dim is None else dim)
        if out < 1 or (hidden is not None and int(hidden) < 1):
            raise MRLError(
                f"The projection on the frozen features needs positive widths, got features.projection_dim="
                f"{dim} and features.hidden={hidden}. Use null (the source's width, one linear layer) or "
                "positive integers."
            )
        self.out_features = out
        if hidden is None:
            self.net = nn.Linear(in_features, out)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_features, int(hidden)), nn.GELU(), nn.Linear(int(hidden), out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def split_last(self) -> tuple[nn.Module | None, nn.Linear]:
        """The layers before the last linear map (``None`` for a linear projection) and that map, which
        training may fold into the Matryoshka head (:mod:`mrl.nn.folded_cross_entropy`)."""
        if isinstance(self.net, nn.Linear):
            return None, self.net
        return self.net[:-1], self.net[-1]


def csr_hidden(feature_head: FeatureHead) -> int:
    """The code width of a ``csr`` feature head: ``expansion`` x the source's features."""
    return round(float(feature_head.settings.get("expansion", 4)) * feature_head.in_features)


def build_feature_head(feature_head: FeatureHead, sizes: Sequence[int]) -> nn.Module:
    """The module ``feature_head`` describes, trained at ``sizes`` (k values for ``csr``, prefix sizes for
    ``adaptor``; unused by ``projection``)."""
    settings: dict[str, Any] = dict(feature_head.settings)
    unknown = sorted(set(settings) - set(SETTINGS_KEYS[feature_head.kind]))
    if unknown:
        raise MRLError(
            f"{unknown[0]} is not a setting of the {feature_head.kind} head; it takes "
            f"{', '.join(SETTINGS_KEYS[feature_head.kind])}."
        )
    if feature_head.kind == "projection":
        return Projection(feature_head.in_features, settings.get("dim"), settings.get("hidden"))
    if feature_head.kind == "csr":
        return SparseAutoencoder(feature_head.in_features, sizes, **settings)
    return MatryoshkaAdaptor(feature_head.in_features, sizes, **settings)


def feature_head_width(module: nn.Module) -> int:
    """The width of the embedding ``z`` a feature head module gives."""
    if isinstance(module, SparseAutoencoder):
        return module.hidden
    if isinstance(module, Projection):
        return module.out_features
    return module.residual[-1].out_features  # the adaptor keeps its input's width


class PosthocBackbone(nn.Module):
    """``z = feature_head(source(x))``: the frozen source backbone (never trained: its parameters do not
    require gradients) and the trained feature head. ``encode_features`` applies the feature head alone,
    to cached features. Exposes what the rest of mrl reads of a backbone (``embed_dim``, ``model``,
    ``data_config()``)."""

    def __init__(self, source: TimmBackbone, feature_head: nn.Module) -> None:
        super().__init__()
        self.source = source.requires_grad_(False)
        self.feature_head = feature_head
        self.embed_dim = feature_head_width(feature_head)

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def data_config(self) -> dict[str, Any]:
        return self.source.data_config()

    def train(self, mode: bool = True) -> PosthocBackbone:
        super().train(mode)
        self.source.eval()  # frozen: its BatchNorm statistics and dropout stay those of evaluation
        return self

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """``z`` of the source's pooled features ``(B, in_features)``."""
        return self.feature_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_head(self.source(x))
