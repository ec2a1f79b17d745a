"""Pre-flight checks of an ``mrl-train`` config: the job's own settings, the optimiser and trainer, the
metric names the job logs, and every group together (:func:`check_train_config`, which takes the model's
and data's checks from beside them)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from mrl.config_checks import (
    FULL,
    Node,
    boolean,
    is_int,
    is_number,
    mapping,
    non_negative_int,
    number_in,
    positive_int,
    require,
)
from mrl.data.checks import check_data
from mrl.errors import MRLError
from mrl.models.checks import (
    check_backbone,
    check_depth_with_objective,
    check_head,
    check_objective,
    check_source,
    config_nesting,
)
from mrl.training.finetune import check_finetune

# What MatryoshkaLitModule logs per stage and size: "{stage}/{name}@{d}" (top5 only with >= 5 classes).
PER_SIZE_METRICS = {"train": ("acc", "loss"), "val": ("acc", "top5", "loss"), "test": ("acc", "top5", "loss")}


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
    check_source(cfg)
    check_finetune(mapping(cfg.get("finetune"), "finetune", "finetune.freeze_backbone=true"), cfg)
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
    boolean(optim, "fused", "optim.")


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
