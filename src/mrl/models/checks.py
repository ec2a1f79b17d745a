"""Pre-flight checks of the model settings: ``head``, ``backbone`` and ``objective`` (plain resolved
nodes; the messages follow :mod:`mrl.config_checks`)."""

from __future__ import annotations

import math
import re

from mrl.config_checks import (
    Node,
    boolean,
    is_int,
    is_number,
    mapping,
    non_negative_int,
    number_in,
    one_of,
    positive_int,
    require,
)
from mrl.errors import MRLError
from mrl.models.build import OBJECTIVE_KINDS, split_head_config
from mrl.models.heads import ALL_HEAD_KINDS, FROZEN_SOURCE_KINDS
from mrl.nn.nesting import default_nesting, validate_nesting

OBJECTIVE_KEYS = ("kind", "temperature", "views", "gather_negatives")


def check_objective(objective: Node) -> None:
    """``objective``: cross-entropy on one view, or a contrastive loss on two or more views."""
    unknown = sorted(set(objective) - set(OBJECTIVE_KEYS))
    if unknown:
        raise MRLError(
            f"objective.{unknown[0]} is not an objective setting. The objective takes "
            f"{', '.join(OBJECTIVE_KEYS)} (conf/objective/supcon.yaml); fix the spelling or drop it."
        )
    one_of(objective, "kind", "objective.", OBJECTIVE_KINDS)
    number_in(objective, "temperature", "objective.", 1e-6, math.inf, "objective.temperature=0.1")
    positive_int(objective, "views", "objective.", "objective.views=2")
    boolean(objective, "gather_negatives", "objective.")
    kind, views = objective.get("kind", "ce"), objective.get("views", 1)
    if kind == "ce" and views != 1:
        raise MRLError(
            f"objective.views={views} with objective=ce: cross-entropy trains on one view of each image. "
            "Use objective=supcon or objective=infonce for several views, or objective.views=1."
        )
    if kind != "ce" and views < 2:
        raise MRLError(
            f"objective.views={views} with objective={kind}: a contrastive loss compares at least two "
            "augmented views of each image. Set objective.views=2."
        )


def check_depth_with_objective(head: Node, objective: Node) -> None:
    """Depth heads (``head.depth_stages``) train with cross-entropy; a contrastive objective trains the
    backbone with its loss alone (the head is a detached probe), so the two do not combine."""
    kind = objective.get("kind", "ce")
    if head.get("depth_stages") and kind != "ce":
        raise MRLError(
            f"head.depth_stages={list(head.get('depth_stages'))} with objective={kind}: the depth heads add "
            "cross-entropy losses on earlier stages, while a contrastive objective trains the backbone "
            "with its own loss alone. Use head.depth_stages with objective=ce, or drop head.depth_stages "
            f"(head.depth_stages=null) to train with objective={kind}."
        )


def check_head(head: Node) -> None:
    split_head_config(dict(head))  # a misspelt head key is an error, not an ignored setting
    kind = head.get("kind", "mrl")
    if kind not in ALL_HEAD_KINDS:
        raise MRLError(
            f"Unknown head kind '{kind}'. Choose one of {', '.join(ALL_HEAD_KINDS)} (head=<kind>)."
        )
    nesting = head.get("nesting")
    if nesting is not None and kind in ("mrl", "mrl_e", *FROZEN_SOURCE_KINDS):
        if not isinstance(nesting, list | tuple):
            raise MRLError(
                f"head.nesting={nesting!r} is a single value, but head.nesting is the list of embedding "
                f"sizes to train at: write head.nesting=[{nesting}] for one size, a list such as "
                "head.nesting=[8,16,32,64], or head.nesting=null for powers of two up to the embedding size."
            )
        validate_nesting(nesting)
    positive_int(head, "min_size", "head.", "head.min_size=8")
    if kind == "ff":
        dim = head.get("dim")
        if not (is_int(dim) and dim > 0):
            raise MRLError(
                f"head=ff needs the number of features its classifier reads, a positive integer, but "
                f"head.dim={dim!r}. Set head.dim=<d>, for example head.dim=8 (sweep it with "
                "-m head.dim=1,2,4,8)."
            )
    for key in ("bias", "fused"):
        boolean(head, key, "head.")
    check_head_training_options(head)
    weights = head.get("weights")
    if weights is not None:
        ok = isinstance(weights, list | tuple) and bool(weights)
        ok = ok and all(is_number(w) and w >= 0 for w in weights) and any(w > 0 for w in weights)
        require(
            ok,
            "head.weights",
            weights,
            "a list of numbers >= 0 (not all 0), one per size",
            "head.weights=[4,2,1,1]",
        )
        sizes = config_nesting(head, None)
        if sizes is not None and len(weights) != len(sizes):
            raise MRLError(
                f"head.weights has {len(weights)} entries but the head trains {len(sizes)} sizes {sizes}: "
                "give one relative importance weight per size, or head.weights=null."
            )


FEATURES_KEYS = ("cache_dir", "dtype", "device", "batch_size", "projection_dim", "hidden")


def check_source(cfg: Node) -> None:
    """``source=`` (a head on a frozen model's cached features) and the settings that go with it: the
    heads that need a source get one, and the settings only end-to-end training has are refused."""
    head = cfg.get("head") or {}
    kind, source = head.get("kind", "mrl"), cfg.get("source")
    if source is None:
        if kind in FROZEN_SOURCE_KINDS:
            raise MRLError(
                f"head={kind} trains on a frozen model's features: name that model with source=<path of an "
                "mrl-train checkpoint, a model.safetensors export or a paper checkpoint>, or source=backbone "
                "for the configured timm backbone with its pretrained weights (docs/posthoc.md)."
            )
        return
    require(
        isinstance(source, str) and bool(source), "source", source, "a path or backbone", "source=backbone"
    )
    _refuse_end_to_end_settings(cfg, str(source))
    _check_features(mapping(cfg.get("features"), "features", "features.dtype=float16"), kind)
    if kind == "csr":
        number_in(head, "expansion", "head.", 1, math.inf, "head.expansion=4")
        one_of(head, "contrastive", "head.", ("none", "instance", "label"))
        positive_int(head, "k_start", "head.", "head.k_start=null", optional=True)
        non_negative_int(head, "k_anneal_steps", "head.", "head.k_anneal_steps=1000")
        for key in ("aux_k", "dead_steps", "wide_factor"):
            positive_int(head, key, "head.", f"head.{key}=4")
    if kind == "adaptor":
        positive_int(head, "hidden_features", "head.", "head.hidden_features=null", optional=True)
        positive_int(head, "neighbours", "head.", "head.neighbours=10")
        boolean(head, "supervised", "head.")


def _refuse_end_to_end_settings(cfg: Node, source: str) -> None:
    """Settings that act on the backbone while it trains, or that describe a backbone other than the
    source: none of them does anything to a frozen source, so they are refused rather than ignored."""
    head, backbone = cfg.get("head") or {}, cfg.get("backbone") or {}
    end_to_end = []
    objective = (cfg.get("objective") or {}).get("kind", "ce")
    if objective != "ce":
        end_to_end.append(
            f"objective={objective} (use objective=ce; head=csr head.contrastive=label is the "
            "supervised contrastive form on frozen features)"
        )
    if head.get("depth_stages"):
        end_to_end.append("head.depth_stages (earlier stages of a frozen source train nothing)")
    finetune = cfg.get("finetune") or {}
    if finetune.get("freeze_backbone") or float(finetune.get("backbone_lr_mult", 1.0)) != 1.0:
        end_to_end.append(
            "finetune.* (the source is frozen whole; fine-tune with ckpt_path= or experiment=retrofit)"
        )
    if backbone.get("embed_dim") is not None:
        end_to_end.append(
            f"backbone.embed_dim={backbone['embed_dim']} (the source's own projection, if it has one, is "
            f"kept; the trained projection's width is features.projection_dim={backbone['embed_dim']})"
        )
    if source != "backbone" and (backbone.get("pretrained") or backbone.get("pretrained_path")):
        end_to_end.append(
            "backbone.pretrained / backbone.pretrained_path (the source file holds its weights; a timm "
            "backbone with a weights file is source=backbone backbone.pretrained_path=<file>)"
        )
    if end_to_end:
        raise MRLError(
            f"source={source} trains only a head on the frozen source's cached features, so these settings "
            f"of end-to-end training do not apply: {'; '.join(end_to_end)}. Drop them, or drop source= to "
            "train end to end."
        )


def _check_features(features: Node, kind: str) -> None:
    """The ``features`` node: the cache and the projection of ``head=mrl|mrl_e|ff|standard``."""
    unknown = sorted(set(features) - set(FEATURES_KEYS))
    if unknown:
        raise MRLError(
            f"features.{unknown[0]} is not a setting of the frozen features. The features node takes "
            f"{', '.join(FEATURES_KEYS)} (conf/train.yaml); fix the spelling or drop it."
        )
    one_of(features, "dtype", "features.", ("float16", "float32"))
    for key in ("batch_size", "projection_dim", "hidden"):
        positive_int(features, key, "features.", f"features.{key}=null", optional=True)
    device = features.get("device")
    require(
        device is None or (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None),
        "features.device",
        device,
        "cpu, cuda, cuda:<index> or null (the GPU when there is one): where the source computes the features",
        "features.device=cuda",
    )
    projection = [k for k in ("projection_dim", "hidden") if features.get(k) is not None]
    if kind in FROZEN_SOURCE_KINDS and projection:
        settings = ", ".join(f"features.{k}={features[k]}" for k in projection)
        raise MRLError(
            f"{settings} with head={kind}: features.projection_dim and features.hidden shape the projection "
            f"that head=mrl|mrl_e|ff|standard learn, and head={kind} has its own module instead "
            f"(conf/head/{kind}.yaml). Drop them, or use head=mrl."
        )


def check_head_training_options(head: Node) -> None:
    """``head.sizes_per_step`` (random sizes per step) and ``head.depth_stages`` / ``depth_weight`` (2D
    Matryoshka); the stage indices are judged against the backbone's stages once it is built."""
    example = "head.sizes_per_step=2 (or null: every size every step)"
    non_negative_int(head, "sizes_per_step", "head.", example, optional=True)
    sizes, per_step = config_nesting(head, None), head.get("sizes_per_step")
    if sizes is not None and is_int(per_step) and per_step > len(sizes) - 1:
        raise MRLError(
            f"head.sizes_per_step={per_step} is more than the head's other sizes: it trains {sizes}, so "
            f"besides the full size at most {len(sizes) - 1} can be drawn each step. Use "
            f"head.sizes_per_step={len(sizes) - 1} or less, or head.sizes_per_step=null to train "
            "every size every step."
        )
    stages = head.get("depth_stages")
    if stages is not None:
        ok = isinstance(stages, list | tuple) and bool(stages)
        ok = ok and all(is_int(s) and s >= 0 for s in stages) and len(set(stages)) == len(stages)
        require(
            ok,
            "head.depth_stages",
            stages,
            "a list of distinct stage indices >= 0 (timm feature_info positions), or null",
            "head.depth_stages=[2,3]",
        )
    number_in(head, "depth_weight", "head.", 0, math.inf, "head.depth_weight=1.0")


def config_nesting(head: Node, embed_dim: int | None) -> list[int] | None:
    """The sizes the head trains at when the config alone fixes them (else None: they depend on the
    backbone's measured embedding size)."""
    kind = head.get("kind", "mrl")
    if kind == "ff" and is_int(head.get("dim")):
        return [head["dim"]]
    if kind == "standard":
        return [embed_dim] if is_int(embed_dim) and embed_dim > 0 else None
    nesting = head.get("nesting")
    if isinstance(nesting, list | tuple):
        return [int(d) for d in nesting]
    if is_int(embed_dim) and embed_dim > 0 and is_int(head.get("min_size", 1)):
        return default_nesting(embed_dim, head.get("min_size", 1))
    return None


def check_backbone(backbone: Node) -> None:
    name = backbone.get("name")
    require(
        isinstance(name, str) and bool(name),
        "backbone.name",
        name,
        "a timm model name",
        "backbone.name=resnet18",
    )
    positive_int(
        backbone,
        "embed_dim",
        "backbone.",
        "backbone.embed_dim=512 (or null: the backbone's own size)",
        optional=True,
    )
    boolean(backbone, "pretrained", "backbone.")
    number_in(backbone, "drop_path_rate", "backbone.", 0, 1, "backbone.drop_path_rate=0.1", optional=True)
    mapping(backbone.get("model_kwargs"), "backbone.model_kwargs", "+backbone.model_kwargs.act_layer=gelu")
