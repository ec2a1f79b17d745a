"""Model descriptions -> modules: :func:`build_model` builds the network a :class:`ModelSpec` describes
(training, evaluation and the deployment API all build it here); :func:`build_parts` adds, from the run's
config, what training needs beside it (the Matryoshka loss and the training-only helpers)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from mrl.errors import MRLError
from mrl.models.backbone import TimmBackbone
from mrl.models.depth import DepthMatryoshka
from mrl.models.heads import build_head, head_nesting
from mrl.models.posthoc import SETTINGS_KEYS, PosthocBackbone, build_feature_head, csr_hidden
from mrl.models.spec import HEAD_KEYS, ModelSpec
from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.feature_head_objective import FeatureHeadObjective
from mrl.nn.matryoshka_contrastive import KINDS as CONTRASTIVE_KINDS
from mrl.nn.matryoshka_contrastive import MatryoshkaContrastiveLoss
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.size_sampling import SizeSampler


class Model(NamedTuple):
    """A built network and its spec, completed with what building measured (embedding size, sizes)."""

    backbone: TimmBackbone | PosthocBackbone
    head: MatryoshkaLinear
    spec: ModelSpec


def build_model(spec: ModelSpec, pretrained: bool = False, pretrained_path: str | None = None) -> Model:
    """The backbone and head ``spec`` describes, with random weights unless ``pretrained`` (timm's
    weights from the local cache) or ``pretrained_path`` (a local file) give the backbone's."""
    backbone = TimmBackbone(
        name=spec.backbone,
        in_chans=spec.in_chans,
        img_size=spec.img_size,
        embed_dim=spec.projection_dim,
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        drop_path_rate=spec.drop_path_rate,
        model_kwargs={key: layer_class(key, value) for key, value in spec.model_kwargs.items()},
        blur_strided_convs=spec.blur_strided_convs,
    )
    features = spec.embed_dim if spec.feature_head is None else spec.feature_head.in_features
    if features is not None and backbone.embed_dim != features:
        raise MRLError(
            f"Backbone {spec.backbone} gives {backbone.embed_dim}-d embeddings here but the model was saved "
            f"with {features}-d ones: the timm version differs from the one that trained it. "
            "Install the timm version the model was trained with."
        )
    if spec.feature_head is not None:
        backbone = PosthocBackbone(backbone, build_feature_head(spec.feature_head, feature_head_sizes(spec)))
    ff_dim = spec.nesting[0] if spec.head == "ff" and spec.nesting else None
    head = build_head(
        spec.head, backbone.embed_dim, spec.num_classes, spec.nesting, spec.min_size, ff_dim, spec.bias
    )
    built = replace(spec, embed_dim=backbone.embed_dim, nesting=tuple(head.nesting))
    return Model(backbone, head, built)


def feature_head_sizes(spec: ModelSpec) -> list[int]:
    """The sizes a post-hoc model's feature head trains at: the head's k values (``csr``) or prefix
    sizes (``adaptor``); a projection has none of its own."""
    head = spec.feature_head
    if head is None or head.kind == "projection":
        return []
    if head.kind == "csr":
        return head_nesting("csr", csr_hidden(head), spec.nesting)
    return head_nesting("mrl", head.in_features, spec.nesting, spec.min_size)


def layer_class(key: str, value: Any) -> Any:
    """A ``model_kwargs`` entry that names a timm layer class the way recipes do (``{_target_:
    hydra.utils.get_class, path: timm.layers.BlurPool2d}``) becomes that class; only ``timm.layers``
    classes are resolved (so a stored spec cannot make building import anything else, and a run trains
    only what ``mrl-eval`` and ``mrl.load`` can rebuild)."""
    if not (isinstance(value, Mapping) and "_target_" in value):
        return value
    path = str(value.get("path", ""))
    if value["_target_"] != "hydra.utils.get_class" or not path.startswith("timm.layers."):
        raise MRLError(
            f"The backbone's model_kwargs.{key} names {dict(value)}; mrl only resolves timm layer classes "
            "(hydra.utils.get_class of timm.layers.*). Name a timm.layers class, or the layer by its timm "
            "name (a string)."
        )
    import timm.layers

    layer = getattr(timm.layers, path.rsplit(".", 1)[1], None)
    if not isinstance(layer, type):
        raise MRLError(f"model_kwargs.{key}: timm.layers has no class {path}; check the timm version.")
    return layer


def spec_from_config(cfg: DictConfig, num_classes: int, in_chans: int, img_size: int) -> ModelSpec:
    """The model ``cfg.backbone`` and ``cfg.head`` describe, for images of this shape."""
    head, _ = split_head_config(OmegaConf.to_container(cfg.head, resolve=True))
    return ModelSpec.from_config(
        OmegaConf.to_container(cfg.backbone, resolve=True), head, num_classes, in_chans, img_size
    )


class ModelParts(NamedTuple):
    backbone: TimmBackbone
    head: MatryoshkaLinear
    # the Matryoshka objective: the head's cross-entropy or a contrastive loss, c_m, the size sampler
    loss: MatryoshkaLoss
    # stage heads (2D Matryoshka), None when off
    depth: DepthMatryoshka | None = None
    # with a contrastive objective or a frozen-feature head's own losses, the cross-entropy of the head,
    # an online probe on the embedding
    probe: MatryoshkaCrossEntropy | None = None
    spec: ModelSpec | None = None  # the built model's (build_model)


# The `head` config group is what users override (head=mrl_e, head.nesting, head.weights): its keys
# configure the head itself (HEAD_KEYS) or, for these, the Matryoshka loss that trains it
# (sizes_per_step: random sizes per step; depth_*: prefix losses on earlier stages, see mrl.models.depth).
LOSS_KEYS = ("weights", "fused", "sizes_per_step", "depth_stages", "depth_weight")


def split_head_config(head_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(head settings, loss settings)`` of the ``head`` config node; an unknown key is an error, not a
    setting silently ignored. ``head=csr`` and ``head=adaptor`` also take their module's settings
    (:data:`mrl.models.posthoc.SETTINGS_KEYS`), which :func:`feature_head_settings` reads."""
    kind = head_cfg.get("kind", "mrl")
    own = SETTINGS_KEYS.get(kind, ()) if kind in ("csr", "adaptor") else ()
    unknown = sorted(set(head_cfg) - set(HEAD_KEYS) - set(LOSS_KEYS) - set(own))
    if unknown:
        extra = f", for the {kind} module {', '.join(own)}" if own else ""
        raise MRLError(
            f"head.{unknown[0]} is not a head setting. The head takes {', '.join(HEAD_KEYS)}{extra} and, "
            f"for its loss, {', '.join(LOSS_KEYS)} (conf/head/{kind}.yaml); fix the spelling or drop it."
        )
    head = {k: head_cfg[k] for k in HEAD_KEYS if k in head_cfg}
    loss = {k: head_cfg[k] for k in LOSS_KEYS if k in head_cfg}
    return head, loss


def build_parts(cfg: DictConfig, spec: ModelSpec) -> ModelParts:
    """The model of ``spec`` (its backbone's initial weights as ``cfg.backbone`` says) and its loss
    (``cfg.head``, ``cfg.loss``)."""
    try:
        backbone, head, spec = build_model(
            spec, bool(cfg.backbone.get("pretrained", False)), cfg.backbone.get("pretrained_path")
        )
    except MRLError:
        raise
    except Exception as err:  # a setting no check knows that timm refuses: named as a config error
        from mrl.instantiate import config_error  # Hydra: only here, so that build_model never imports it

        raise config_error(cfg.backbone, err) from err
    _, loss_settings = split_head_config(OmegaConf.to_container(cfg.head, resolve=True))
    weights = loss_settings.get("weights")
    check_loss_weights(weights, head.nesting)
    per_step = loss_settings.get("sizes_per_step")
    sampler = None if per_step is None else SizeSampler(len(head.nesting), per_step, cfg.get("seed") or 0)
    cross_entropy = MatryoshkaCrossEntropy(fused=loss_settings.get("fused", True), **cfg.get("loss", {}))
    # The per-size loss that trains the embedding; beside it the head's cross-entropy is a probe on the
    # detached embedding (a contrastive objective, or a frozen-feature head's own losses).
    contrastive = build_objective(cfg, head)
    if spec.feature_head is not None and spec.feature_head.kind != "projection":
        contrastive = FeatureHeadObjective(backbone.feature_head)
    per_size_loss = cross_entropy if contrastive is None else contrastive
    loss = MatryoshkaLoss(weights, per_size_loss=per_size_loss, sampler=sampler)
    stages = loss_settings.get("depth_stages")
    depth = None
    if stages is not None:  # the stage heads share the final head's objective
        depth = DepthMatryoshka(backbone, head, stages, loss, loss_settings.get("depth_weight", 1.0))
    return ModelParts(backbone, head, loss, depth, None if contrastive is None else cross_entropy, spec)


def check_loss_weights(weights: list | None, nesting: list[int]) -> None:
    """``head.weights``: one finite, non-negative relative importance per size, not all zero (a loss
    weighted by zeros never moves, and the run would report an untrained model)."""
    if weights is None:
        return
    if len(weights) != len(nesting):
        raise MRLError(
            f"head.weights has {len(weights)} entries but the head trains {len(nesting)} sizes "
            f"{nesting}: give one relative importance weight per size, or head.weights=null."
        )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        values = [float("nan")]
    if not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        raise MRLError(
            f"head.weights={list(weights)} cannot train: each size's weight must be a finite number >= 0 "
            "and at least one must be positive (the loss is their weighted sum). Use e.g. "
            f"head.weights=[{','.join('1' for _ in nesting)}] or head.weights=null."
        )


OBJECTIVE_KINDS = ("ce", *CONTRASTIVE_KINDS)


def build_objective(cfg: DictConfig, head: MatryoshkaLinear) -> MatryoshkaContrastiveLoss | None:
    """The contrastive per-size loss of ``cfg.objective`` over the head's sizes, or None for cross-entropy
    (``objective=ce``, the default, and configs written before the ``objective`` group existed).

    :func:`build_parts` wraps it in the run's :class:`MatryoshkaLoss` (``head.weights``, the size
    sampler), the one place that weighs sizes.
    """
    objective = cfg.get("objective") or {}
    kind = str(objective.get("kind", "ce"))
    if kind == "ce":
        return None
    return MatryoshkaContrastiveLoss(
        head.nesting,
        kind=kind,
        temperature=float(objective.get("temperature", 0.1)),
        views=int(objective.get("views", 2)),
        gather=bool(objective.get("gather_negatives", True)),
    )
