"""Pre-flight checks of settings: every value that can be judged before any work starts is judged here.

Each function takes plain resolved config nodes (dicts and lists, no Hydra or OmegaConf objects) and
raises an :class:`MRLError` naming the key, the value and what to write instead. The commands call them
before they create output or start training (see :mod:`mrl.preflight`), so a typo costs seconds, not
a training run.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrl.errors import MRLError
from mrl.models.build import OBJECTIVE_KINDS, split_head_config
from mrl.models.heads import HEAD_KINDS
from mrl.nn.nesting import default_nesting, validate_nesting

Node = Mapping[str, Any]
# What MatryoshkaLitModule logs per stage and size: "{stage}/{name}@{d}" (top5 only with >= 5 classes).
PER_SIZE_METRICS = {"train": ("acc", "loss"), "val": ("acc", "top5", "loss"), "test": ("acc", "top5", "loss")}
FULL = "full"
# mrl-eval's quantised storage formats (mrl.eval.quantized) and binary thresholds
QUANTIZED_FORMATS = ("int8", "binary")
BINARY_THRESHOLDS = ("zero", "mean")


# ---- value predicates ---------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, value: Any, what: str, example: str) -> None:
    """Raise the standard message for ``key=value`` when ``ok`` is false: what the key takes, an example."""
    if not ok:
        raise MRLError(f"{key}={value!r} is not valid: {key} must be {what}. For example {example}.")


def positive_int(node: Node, key: str, prefix: str, example: str, optional: bool = False) -> None:
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    require(is_int(value) and value > 0, f"{prefix}{key}", value, "a positive integer", example)


def non_negative_int(node: Node, key: str, prefix: str, example: str, optional: bool = False) -> None:
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    require(is_int(value) and value >= 0, f"{prefix}{key}", value, "an integer >= 0", example)


def boolean(node: Node, key: str, prefix: str) -> None:
    if key in node:
        require(
            isinstance(node[key], bool), f"{prefix}{key}", node[key], "true or false", f"{prefix}{key}=true"
        )


def number_in(
    node: Node, key: str, prefix: str, low: float, high: float, example: str, optional: bool = False
):
    """``low <= node[key] <= high`` (``high`` may be ``inf``)."""
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    bounds = f"a number >= {low}" if math.isinf(high) else f"a number from {low} to {high}"
    require(is_number(value) and low <= value <= high, f"{prefix}{key}", value, bounds, example)


def int_list(node: Node, key: str, prefix: str, example: str, allow_full: bool = False) -> None:
    """A non-empty list of positive integers (``full``: the embedding size, where allowed)."""
    if key not in node or node[key] is None:
        return
    value = node[key]
    ok = isinstance(value, list | tuple) and bool(value)
    ok = ok and all((is_int(v) and v > 0) or (allow_full and v == FULL) for v in value)
    what = "a list of positive integers" + (" (or 'full')" if allow_full else "")
    require(ok, f"{prefix}{key}", value, what, example)


def one_of(node: Node, key: str, prefix: str, choices: Sequence[Any]) -> None:
    if key not in node:
        return
    value = node[key]
    if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not true here
        names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]  # as written in YAML
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise MRLError(f"{prefix}{key}={value!r} is not valid: {prefix}{key} must be {listed}.")


def mapping(node: Any, key: str, example: str) -> Node:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise MRLError(
            f"{key}={node!r} is not valid: {key} must be a group of settings. For example {example}."
        )
    return node


# ---- mrl-train -----------------------------------------------------------------------------------


def check_train_config(cfg: Node) -> None:
    """Every ``mrl-train`` setting that can be judged from the config alone."""
    head = mapping(cfg.get("head"), "head", "head=mrl")
    check_head(head)
    check_backbone(mapping(cfg.get("backbone"), "backbone", "backbone=timm"))
    check_data(mapping(cfg.get("data"), "data", "data=fashion_mnist"))
    check_optim(mapping(cfg.get("optim"), "optim", "optim=adamw"))
    sched = mapping(cfg.get("sched"), "sched", "sched=cosine")
    check_trainer(
        mapping(cfg.get("trainer"), "trainer", "trainer=cpu"), has_schedule=bool(sched.get("_target_"))
    )
    check_job(cfg)
    objective = mapping(cfg.get("objective"), "objective", "objective=supcon")
    check_objective(objective)
    check_depth_with_objective(head, objective)
    embed_dim = (cfg.get("backbone") or {}).get("embed_dim")
    check_optimized_metric(cfg.get("optimized_metric"), config_nesting(head, embed_dim), logged_stages(cfg))


def check_job(cfg: Node) -> None:
    """Top-level settings of the training job."""
    require(is_int(cfg.get("seed", 0)), "seed", cfg.get("seed"), "an integer", "seed=0")
    positive_int(cfg, "threads", "", "threads=4 (or threads=null for PyTorch's default)", optional=True)
    non_negative_int(cfg, "checkpoint_every_n_steps", "", "checkpoint_every_n_steps=50", optional=True)
    number_in(cfg, "progress_bar_refresh_s", "", 0, math.inf, "progress_bar_refresh_s=1.0")
    for key in ("test", "compile", "channels_last"):
        boolean(cfg, key, "")
    loss = mapping(cfg.get("loss"), "loss", "loss.label_smoothing=0.1")
    number_in(loss, "label_smoothing", "loss.", 0, 1, "loss.label_smoothing=0.1")
    evaluate = cfg.get("evaluate")
    if evaluate is not None and not isinstance(evaluate, Mapping):
        raise MRLError(
            f"evaluate={evaluate!r} is not valid: evaluate takes mrl-eval settings. Write evaluate={{}} to "
            "evaluate with mrl-eval's defaults, evaluate='{methods: {adaptive_retrieval: false}}' for a "
            "subset, or evaluate=null for no evaluation."
        )
    metric = cfg.get("optimized_metric")
    if metric is not None and not isinstance(metric, str):
        raise MRLError(
            f"optimized_metric={metric!r} is not valid: name a metric, e.g. optimized_metric=val/acc@full."
        )


OBJECTIVE_KEYS = ("kind", "temperature", "views")


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
    if kind not in HEAD_KINDS:
        raise MRLError(f"Unknown head kind '{kind}'. Choose one of {', '.join(HEAD_KINDS)} (head=<kind>).")
    nesting = head.get("nesting")
    if nesting is not None and kind in ("mrl", "mrl_e"):
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


# Keys the datamodules share, with an example of a good value each.
DATA_POSITIVE = {
    "batch_size": "data.batch_size=256",
    "in_chans": "data.in_chans=3",
    "num_classes": "data.num_classes=10",
}
DATA_OPTIONAL_POSITIVE = {
    "eval_batch_size": "data.eval_batch_size=1000",
    "img_size": "data.img_size=224",
    "eval_img_size": "data.eval_img_size=256",
    "limit_train": "data.limit_train=2048",
    "limit_eval": "data.limit_eval=1000",
    "prefetch_factor": "data.prefetch_factor=2",
}
DATA_COUNTS = {
    "train_size": "data.train_size=512",
    "val_size": "data.val_size=5000",
    "test_size": "data.test_size=128",
    "crop_padding": "data.crop_padding=4",
}


def check_data(data: Node, prefix: str = "data.") -> None:
    for key, example in DATA_POSITIVE.items():
        positive_int(data, key, prefix, example)
    for key, example in DATA_OPTIONAL_POSITIVE.items():
        positive_int(data, key, prefix, example, optional=True)
    for key, example in DATA_COUNTS.items():
        non_negative_int(data, key, prefix, example)
    workers = data.get("num_workers", 0)
    auto = "decode" in data  # the encoded-image datamodules share the node's CPUs out themselves
    require(
        (is_int(workers) and workers >= 0) or (auto and workers == "auto"),
        f"{prefix}num_workers",
        workers,
        "a number of loader workers >= 0 (0: load in the training process)" + (" or 'auto'" if auto else ""),
        f"{prefix}num_workers=4",
    )
    number_in(data, "noise", prefix, 0, math.inf, f"{prefix}noise=1.0")
    for key in ("download", "in_memory", "pin_memory", "shuffle"):
        boolean(data, key, prefix)


def accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments the class ``target`` (an ``mrl.`` component) accepts, following ``**kwargs``
    up its base classes; None when it cannot be told (not ours, or open-ended)."""
    if not target.startswith("mrl."):
        return None
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    keys: set[str] = set()
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
    return None


def check_known_keys(node: Node, key: str, extra: Node | None = None, how: str = "") -> None:
    """Refuse keys of ``extra`` (overrides merged into ``node``, default: ``node`` itself) that the
    component ``node['_target_']`` does not take, naming the valid ones."""
    target = node.get("_target_")
    valid = accepted_keys(str(target)) if target else None
    if valid is None:
        return
    if extra is not None:  # the stored node's own keys were accepted when it was built
        valid |= {k for k in node if not str(k).startswith("_")}
    unknown = sorted(
        k for k in (node if extra is None else extra) if not str(k).startswith("_") and k not in valid
    )
    if unknown:
        raise MRLError(
            f"{key} has no setting {', '.join(repr(k) for k in unknown)} ({target} does not take it){how}. "
            f"The valid {key} keys are: {', '.join(sorted(valid))}."
        )


def check_optim(optim: Node) -> None:
    if "lr" in optim:
        lr = optim["lr"]
        if not is_number(lr):
            raise MRLError(
                f"optim.lr={lr!r} is not a number: give the learning rate as one, e.g. optim.lr=0.001."
            )
        if lr <= 0:
            raise MRLError(
                f"optim.lr={lr!r} is not valid: the learning rate must be above 0, e.g. optim.lr=0.001."
            )
    number_in(optim, "weight_decay", "optim.", 0, math.inf, "optim.weight_decay=0.05")
    number_in(optim, "momentum", "optim.", 0, 1, "optim.momentum=0.9")


def check_trainer(trainer: Node, has_schedule: bool) -> None:
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if epochs is not None:
        require(
            is_int(epochs) and epochs >= -1,
            "trainer.max_epochs",
            epochs,
            "a number of epochs (or -1: no epoch limit, with +trainer.max_steps=<steps>)",
            "trainer.max_epochs=10",
        )
    require(
        is_int(steps) and steps >= -1,
        "trainer.max_steps",
        steps,
        "a number of steps (-1: no limit)",
        "+trainer.max_steps=1000",
    )
    if epochs == -1 and has_schedule and steps == -1:
        raise MRLError(
            "trainer.max_epochs=-1 trains without an epoch limit, but the learning-rate schedule needs to "
            "know how long the run is. Give a number of epochs (trainer.max_epochs=10), or a number of steps "
            "(+trainer.max_steps=1000), or use a constant learning rate (sched=none)."
        )
    positive_int(trainer, "log_every_n_steps", "trainer.", "trainer.log_every_n_steps=20")
    positive_int(
        trainer, "check_val_every_n_epoch", "trainer.", "trainer.check_val_every_n_epoch=1", optional=True
    )
    positive_int(trainer, "accumulate_grad_batches", "trainer.", "+trainer.accumulate_grad_batches=2")
    if "num_sanity_val_steps" in trainer:
        value = trainer["num_sanity_val_steps"]
        require(
            is_int(value) and value >= -1,
            "trainer.num_sanity_val_steps",
            value,
            "an integer >= -1",
            "trainer.num_sanity_val_steps=1",
        )
    number_in(
        trainer, "gradient_clip_val", "trainer.", 0, math.inf, "trainer.gradient_clip_val=1.0", optional=True
    )


# ---- metric names ----------------------------------------------------------------------------------


def logged_stages(cfg: Node) -> tuple[str, ...]:
    """The stages whose metrics reach the job's results: train, val, and test unless ``test=false``."""
    return ("train", "val", "test") if cfg.get("test", True) else ("train", "val")


def metric_names(nesting: Sequence[int], stages: Sequence[str], top5: bool = True) -> list[str]:
    """Every metric key a job with these sizes and stages returns (results.json, optimized_metric)."""
    names = [f"{stage}/loss" for stage in stages] + (["train/lr"] if "train" in stages else [])
    for stage in stages:
        for name in PER_SIZE_METRICS[stage]:
            if name != "top5" or top5:
                names += [f"{stage}/{name}@{d}" for d in nesting]
    return names


METRIC_FORM = re.compile(r"^(?P<stage>[a-z]+)/(?P<name>[a-z0-9]+)(@(?P<size>\w+))?$")


def check_optimized_metric(
    metric: str | None, nesting: Sequence[int] | None, stages: Sequence[str], top5: bool = True
) -> None:
    """``optimized_metric`` must name a metric the job logs (``@full``: its largest size). With
    ``nesting`` None (not known before the backbone is built) only the form and stage are checked."""
    if not metric:
        return
    sizes = "the head's sizes" if nesting is None else f"its sizes {list(nesting)}"
    sized = ", ".join(
        f"{stage}/{name}@<d>"
        for stage in stages
        for name in PER_SIZE_METRICS[stage]
        if name != "top5" or top5
    )
    plain = ", ".join([f"{stage}/loss" for stage in stages] + (["train/lr"] if "train" in stages else []))
    advice = (
        f"This job logs {plain} and {sized} for d in {sizes} or d=full (the largest size). Sweeps usually "
        "optimise val/acc@full."
    )
    match = METRIC_FORM.match(metric)
    stage, name, size = (match["stage"], match["name"], match["size"]) if match else (None, None, None)
    known_name = stage in stages and (
        (size is None and (name == "loss" or (stage, name) == ("train", "lr")))
        or (size is not None and name in PER_SIZE_METRICS[stage] and (name != "top5" or top5))
    )
    if not known_name:
        off = " (test=false: no test metrics)" if stage == "test" and "test" not in stages else ""
        raise MRLError(f"optimized_metric={metric} is not a metric this job logs{off}. {advice}")
    if size is None or size == FULL:
        return
    if not (size.isdigit() and int(size) > 0):
        raise MRLError(f"optimized_metric={metric}: '@{size}' is not a size. {advice}")
    if nesting is not None and int(size) not in nesting:
        raise MRLError(
            f"optimized_metric={metric} names size {size}, which this job does not train ({sizes}). Use "
            f"one of them, e.g. {stage}/{name}@{nesting[-1]}, or {stage}/{name}@full for the largest."
        )


# ---- mrl-eval ----------------------------------------------------------------------------------------


def check_eval_config(cfg: Node, prefix: str = "") -> None:
    """Every ``mrl-eval`` setting that can be judged before the checkpoint is read (``prefix``:
    ``evaluate.`` when the settings come from mrl-train's ``evaluate=``)."""
    p = prefix
    positive_int(cfg, "threads", p, f"{p}threads=4", optional=True)
    device = cfg.get("device", "auto")
    require(
        isinstance(device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
        f"{p}device",
        device,
        "auto, cpu, cuda or cuda:<index>",
        f"{p}device=cpu",
    )
    one_of(cfg, "embedding_dtype", p, ("float32", "float16"))
    boolean(cfg, "export_model", p)
    for key in ("database_split", "query_split"):
        if key in cfg:
            require(isinstance(cfg[key], str), f"{p}{key}", cfg[key], "a split name", f"{p}{key}=test")
    int_list(cfg, "sizes", p, f"{p}sizes=[8,16,32] (or null: every trained size)")
    mapping(cfg.get("data"), f"{p}data", f"+{p}data.data_dir=/data/fmnist")
    methods = mapping(cfg.get("methods"), f"{p}methods", f"{p}methods.knn=false")
    for key in methods:
        boolean(methods, key, f"{p}methods.")
    knn = mapping(cfg.get("knn"), f"{p}knn", f"{p}knn.k=10")
    positive_int(knn, "k", f"{p}knn.", f"{p}knn.k=10")
    retrieval = mapping(cfg.get("retrieval"), f"{p}retrieval", f"{p}retrieval.ks=[10,100]")
    int_list(retrieval, "ks", f"{p}retrieval.", f"{p}retrieval.ks=[10,25,50,100]")
    _check_adaptive_classification(
        mapping(cfg.get("adaptive_classification"), f"{p}adaptive_classification", "{}"), p
    )
    _check_adaptive_retrieval(mapping(cfg.get("adaptive_retrieval"), f"{p}adaptive_retrieval", "{}"), p)
    baselines = mapping(cfg.get("baselines"), f"{p}baselines", f"{p}baselines.svd=true")
    one_of(baselines, "models", f"{p}baselines.", ("all", "standard"))
    one_of(baselines, "knn", f"{p}baselines.", (True, False, "auto"))
    for key in ("svd", "interpolation"):
        boolean(baselines, key, f"{p}baselines.")
    int_list(baselines, "sizes", f"{p}baselines.", f"{p}baselines.sizes=[8,16,32]")
    positive_int(baselines, "max_train", f"{p}baselines.", f"{p}baselines.max_train=5000")
    positive_int(baselines, "max_iter", f"{p}baselines.", f"{p}baselines.max_iter=100")
    check_quantized(mapping(cfg.get("quantized"), f"{p}quantized", f"{p}quantized.k=10"), p)
    chunks = mapping(cfg.get("chunks"), f"{p}chunks", f"{p}chunks.query=4096")
    for key in chunks:
        positive_int(chunks, key, f"{p}chunks.", f"{p}chunks.{key}=4096")
    if "robustness" in cfg:
        robustness_sets(cfg["robustness"], p)


def check_quantized(qc: Node, p: str) -> None:
    """``quantized``: distinct known formats (float32 is always the reference), k, binary threshold."""
    q = f"{p}quantized."
    if "formats" in qc:
        value = qc["formats"]
        ok = isinstance(value, list | tuple) and bool(value) and len(set(map(str, value))) == len(value)
        require(
            ok and all(v in QUANTIZED_FORMATS for v in value),
            f"{q}formats",
            value,
            f"a list of distinct formats among {', '.join(QUANTIZED_FORMATS)} (float32 is always measured "
            f"as the reference; methods.quantized=false turns the measurement off)",
            f"{q}formats=[int8,binary]",
        )
    positive_int(qc, "k", q, f"{q}k=10")
    one_of(qc, "binary_threshold", q, BINARY_THRESHOLDS)


def _check_adaptive_classification(ac: Node, p: str) -> None:
    q = f"{p}adaptive_classification."
    targets = ac.get("targets")
    if targets is not None:
        ok = (
            isinstance(targets, list | tuple)
            and bool(targets)
            and all(is_number(t) and 0 < t <= 1 for t in targets)
        )
        require(
            ok, f"{q}targets", targets, "a list of accuracies in (0, 1] (or null)", f"{q}targets=[0.8,0.9]"
        )
    positive_int(ac, "num_targets", q, f"{q}num_targets=10")
    positive_int(ac, "num_splits", q, f"{q}num_splits=5")
    if "grid_size" in ac:
        value = ac["grid_size"]
        require(is_int(value) and value >= 2, f"{q}grid_size", value, "an integer >= 2", f"{q}grid_size=101")
    if "calibration_fraction" in ac:
        value = ac["calibration_fraction"]
        require(
            is_number(value) and 0 < value < 1,
            f"{q}calibration_fraction",
            value,
            "a fraction strictly between 0 and 1",
            f"{q}calibration_fraction=0.5",
        )


def _check_adaptive_retrieval(ar: Node, p: str) -> None:
    q = f"{p}adaptive_retrieval."
    funnel = ar.get("funnel")
    if funnel:
        funnel = mapping(funnel, f"{q}funnel", f"{q}funnel.shortlist_size=8")
        positive_int(funnel, "shortlist_size", f"{q}funnel.", f"{q}funnel.shortlist_size=8")
        int_list(
            funnel, "rerank_sizes", f"{q}funnel.", f"{q}funnel.rerank_sizes=[16,32,full]", allow_full=True
        )
        int_list(funnel, "shortlists", f"{q}funnel.", f"{q}funnel.shortlists=[200,100,10]")
        rerank, shortlists = funnel.get("rerank_sizes") or [], funnel.get("shortlists") or []
        if len(rerank) != len(shortlists):
            raise MRLError(
                f"{q}funnel.rerank_sizes has {len(rerank)} entries but {q}funnel.shortlists has "
                f"{len(shortlists)}: give one shortlist length per rerank size."
            )
    int_list(ar, "shortlist_sizes", q, f"{q}shortlist_sizes=[8,16,32]")
    positive_int(ar, "shortlist_k", q, f"{q}shortlist_k=200")
    if "rerank_size" in ar:
        value = ar["rerank_size"]
        require(
            (is_int(value) and value > 0) or value == FULL,
            f"{q}rerank_size",
            value,
            "a size or 'full'",
            f"{q}rerank_size=full",
        )
    boolean(ar, "hnsw", q)
    for key in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction"):
        positive_int(ar, key, q, f"{q}{key}=40")


# ---- mrl-eval's robustness sets -----------------------------------------------------------------

ROBUSTNESS_SET_KEYS = ("root", "restrict", "folders")
# how a set's class folders name the training classes: by class name, or by label index (ImageNet-V2)
ROBUSTNESS_FOLDERS = ("names", "indices")


def robustness_sets(node: Any, p: str) -> dict[str, dict[str, Any]]:
    """``robustness.sets`` checked, as ``{name: {"root": Path, "restrict": bool, "folders": str}}`` (a
    set's own ``restrict`` / ``folders``, else ``robustness.restrict`` / ``robustness.folders``): every
    name usable in file names, every root an existing folder. Whether its folders are training classes
    is checked once the checkpoint's data is known (:mod:`mrl.eval.robustness`)."""
    q = f"{p}robustness."
    robustness = mapping(node, f"{p}robustness", f"+{q}sets.v2=/data/imagenetv2")
    boolean(robustness, "restrict", q)
    one_of(robustness, "folders", q, ROBUSTNESS_FOLDERS)
    sets = mapping(robustness.get("sets"), f"{q}sets", f"+{q}sets.v2=/data/imagenetv2")
    return {str(name): _robustness_set(str(name), spec, robustness, q) for name, spec in sets.items()}


def _robustness_set(name: str, spec: Any, defaults: Node, q: str) -> dict[str, Any]:
    key = f"{q}sets.{name}"
    require(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None,
        f"{q}sets",
        name,
        "named with letters, digits, '_', '-' and '.' (the name is part of file names)",
        f"+{q}sets.imagenet_a=/data/imagenet-a",
    )
    spec = {"root": spec} if isinstance(spec, str) else mapping(spec, key, f"+{key}=/data/{name}")
    unknown = sorted(set(spec) - set(ROBUSTNESS_SET_KEYS))
    if unknown or not isinstance(spec.get("root"), str):
        raise MRLError(
            f"{key}={spec!r} is not valid: give the set's folder ({key}=<dir>) or "
            f"{{root: <dir>, restrict: true|false, folders: names|indices}} (keys "
            f"{', '.join(ROBUSTNESS_SET_KEYS)}{'; unknown: ' + ', '.join(unknown) if unknown else ''})."
        )
    boolean(spec, "restrict", f"{key}.")
    one_of(spec, "folders", f"{key}.", ROBUSTNESS_FOLDERS)
    root = Path(spec["root"]).expanduser().absolute()
    if not root.is_dir():
        raise MRLError(
            f"{key}: {root} {'is not a folder' if root.exists() else 'does not exist'}. Give the root "
            "of an ImageFolder tree, <root>/<class>/<image>, whose folders are named after the "
            "training data's classes (WNIDs for ImageNet)."
        )
    return {
        "root": root,
        "restrict": bool(spec.get("restrict", defaults["restrict"])),
        "folders": str(spec.get("folders", defaults["folders"])),
    }
