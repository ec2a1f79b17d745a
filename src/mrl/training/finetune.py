"""Fine-tuning a pretrained backbone: freeze it (all of it, or all but its last N stages), unfreeze it at
an epoch, and train it at a multiple of the learning rate (the ``finetune`` config node).

Stages are timm's ``feature_info`` of the backbone model (its module names). Freezing keeps every
module registered up to the end of the last frozen stage out of training, the stem included; the projection
(``backbone.embed_dim``) and the heads always train. Lightning's :class:`BaseFinetuning` does the freezing
(``requires_grad`` off, BatchNorm statistics off) and calls the unfreezing at each epoch's start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mrl.config_checks import Node, is_int, is_number
from mrl.errors import MRLError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """The ``finetune`` config node (conf/train.yaml documents each key)."""

    freeze_backbone: bool = False
    train_last_stages: int = 0
    unfreeze_at_epoch: int | None = None
    backbone_lr_mult: float = 1.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> FinetuneSettings:
        node = node or {}
        defaults = cls()
        return cls(
            freeze_backbone=bool(node.get("freeze_backbone", defaults.freeze_backbone)),
            train_last_stages=int(node.get("train_last_stages", defaults.train_last_stages) or 0),
            unfreeze_at_epoch=node.get("unfreeze_at_epoch", defaults.unfreeze_at_epoch),
            backbone_lr_mult=float(node.get("backbone_lr_mult", defaults.backbone_lr_mult)),
        )


# ---- which modules are frozen ------------------------------------------------------------------------


def stage_names(model: nn.Module) -> list[str]:
    """The module names of ``model``'s stages (timm's ``feature_info``), first to last."""
    info = getattr(model, "feature_info", None)
    return [str(stage["module"]) for stage in info] if isinstance(info, list | tuple) else []


def frozen_modules(model: nn.Module, train_last_stages: int, name: str = "backbone") -> list[nn.Module]:
    """The modules of ``model`` whose own parameters freeze when only its last ``train_last_stages``
    stages train: every module registered up to the end of the stage before them (the stem included, and
    their ancestors, for their own parameters such as a ViT's position embedding). All with 0 stages, none
    with all of them. The boundary is the end of the previous stage, not the start of the first trainable
    one, since ``feature_info`` may name a module after a stage's blocks (timm's ByobNet reports its last
    stage at ``final_conv``)."""
    modules = list(model.named_modules())
    if train_last_stages == 0:
        return [module for _, module in modules]
    stages = stage_names(model)
    if train_last_stages > len(stages):
        listed = ", ".join(f"{i} ({s})" for i, s in enumerate(stages)) or "none"
        raise MRLError(
            f"finetune.train_last_stages={train_last_stages} but backbone '{name}' has {len(stages)} stages "
            f"(timm's feature_info: {listed}). Train at most its last {len(stages)} stages, or set "
            "finetune.freeze_backbone=false to train the whole backbone."
        )
    if train_last_stages == len(stages):
        return []
    previous = stages[-train_last_stages - 1]
    end = max(i for i, (n, _) in enumerate(modules) if n == previous or n.startswith(previous + "."))
    return [module for _, module in modules[: end + 1]]


def freeze(modules: list[nn.Module]) -> None:
    """``requires_grad`` off for the modules' own parameters (not their children's: an ancestor of a
    trainable stage keeps it trainable), BatchNorm layers in eval mode so their statistics stay those
    of the pretrained weights (BaseFinetuning.freeze with train_bn=False, which would recurse)."""
    for module in modules:
        BaseFinetuning.freeze_module(module)
        if isinstance(module, _BatchNorm):
            module.eval()


class StageFinetuning(BaseFinetuning):
    """Freezes the backbone's stages before training (all, or all but the last ``train_last_stages``)
    and, with ``unfreeze_at_epoch``, makes them trainable from that epoch on.

    The frozen parameters are already in the optimizer (:func:`optimizer_kwargs`), so unfreezing does not
    add param groups: timm's schedule sets the learning rate of the groups it knew when it was built
    only, so a group added later (``unfreeze_and_add_param_group``) would skip the warmup and the
    cosine decay. A frozen parameter has no gradient, so the optimizer keeps no state for it."""

    def __init__(self, settings: FinetuneSettings) -> None:
        super().__init__()
        self.settings = settings
        self._frozen: list[nn.Module] = []

    def freeze_before_training(self, pl_module: nn.Module) -> None:
        if not self.settings.freeze_backbone:
            return
        backbone = pl_module.backbone
        self._frozen = frozen_modules(backbone.model, self.settings.train_last_stages, backbone.name)
        freeze(self._frozen)
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise MRLError(
                "finetune.freeze_backbone=true leaves no parameter of the model to train. Train some of the "
                "backbone's stages (finetune.train_last_stages=1), unfreeze it later "
                "(finetune.unfreeze_at_epoch=1), or add a trained projection (backbone.embed_dim=<size>)."
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # No param group is ever added, so none is recorded for a resume: BaseFinetuning would record the
        # groups of the first epoch and put them back on resuming, their learning rates included.
        for optimizer in trainer.optimizers:
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def finetune_function(self, pl_module: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        # `>=`, not `==`: a run resumed after the unfreezing epoch freezes in setup and unfreezes here.
        at = self.settings.unfreeze_at_epoch
        if at is None or epoch < at or not self._frozen:
            return
        BaseFinetuning.make_trainable(self._frozen)
        for module in self._frozen:
            module.train(pl_module.training)
        log.info("Unfroze the backbone at epoch %d.", epoch)
        self._frozen = []


def finetune_callbacks(cfg: Mapping[str, Any], backbone: nn.Module) -> list[StageFinetuning]:
    """The callback ``cfg.finetune`` asks for (none by default); the stage count is checked now, against
    the built backbone, before training starts."""
    settings = FinetuneSettings.from_config(cfg.get("finetune"))
    if not settings.freeze_backbone:
        return []
    frozen_modules(backbone.model, settings.train_last_stages, getattr(backbone, "name", "backbone"))
    return [StageFinetuning(settings)]


# ---- the optimizer's param groups --------------------------------------------------------------------


@contextmanager
def _all_trainable(module: nn.Module) -> Iterator[None]:
    """Every parameter marked trainable for the duration (timm's grouping skips frozen ones)."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def param_groups(
    module: nn.Module,
    backbone: nn.Module,
    lr: float,
    backbone_lr_mult: float,
    weight_decay: float = 0.0,
    weight_decay_exclude_1d: bool = True,
) -> list[dict[str, Any]]:
    """timm's weight-decay groups of ``module`` (frozen parameters included), each split into the part
    outside ``backbone`` (at the optimizer's lr) and the part inside it (at ``lr * backbone_lr_mult``)."""
    with _all_trainable(module):
        groups = param_groups_weight_decay(
            module, weight_decay=weight_decay, weight_decay_exclude_1d=weight_decay_exclude_1d
        )
    inside = {id(p) for p in backbone.parameters()}
    split = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in inside]
        own = [p for p in group["params"] if id(p) in inside]
        split += [{**group, "params": rest}] if rest else []
        split += [{**group, "params": own, "lr": lr * backbone_lr_mult}] if own else []
    return split


def optimizer_kwargs(
    factory: Callable[..., torch.optim.Optimizer], backbone: nn.Module, mult: float
) -> dict[str, Any]:
    """Extra arguments for the optimizer ``factory`` (a partial of timm's ``create_optimizer_v2``): none
    when the backbone trains whole at the optimizer's lr (timm groups the module as always), else a
    ``param_group_fn`` giving the backbone its own groups at ``lr * mult``, frozen parameters included."""
    if mult == 1.0 and all(p.requires_grad for p in backbone.parameters()):
        return {}
    keywords = getattr(factory, "keywords", {})
    if not is_number(keywords.get("lr")):
        raise MRLError(
            "finetune settings need the optimizer's learning rate (optim.lr) to set the backbone's, but the "
            "optimizer config gives none. Set optim.lr=<learning rate>."
        )
    group_fn = partial(
        param_groups,
        backbone=backbone,
        lr=float(keywords["lr"]),
        backbone_lr_mult=mult,
        weight_decay=float(keywords.get("weight_decay", 0.0)),
        weight_decay_exclude_1d=bool(keywords.get("weight_decay_exclude_1d", True)),
    )
    return {"param_group_fn": group_fn}


# ---- config checks -----------------------------------------------------------------------------------


def check_finetune(node: Node, cfg: Node) -> None:
    """The ``finetune`` settings alone and against the objective, backbone and trainer of ``cfg``."""
    if not node:
        return
    freeze_on = node.get("freeze_backbone", False)
    if not isinstance(freeze_on, bool):
        raise MRLError(
            f"finetune.freeze_backbone={freeze_on!r} is not valid: it must be true or false. For example "
            "finetune.freeze_backbone=true."
        )
    stages, at = node.get("train_last_stages", 0), node.get("unfreeze_at_epoch")
    mult = node.get("backbone_lr_mult", 1.0)
    if not (is_int(stages) and stages >= 0):
        raise MRLError(
            f"finetune.train_last_stages={stages!r} is not valid: it is how many of the backbone's last "
            "stages (timm's feature_info) still train while it is frozen, an integer >= 0. For example "
            "finetune.train_last_stages=2 (0: the whole backbone frozen)."
        )
    if at is not None and not (is_int(at) and at >= 0):
        raise MRLError(
            f"finetune.unfreeze_at_epoch={at!r} is not valid: it is the epoch from which the frozen backbone "
            "trains, an integer >= 0. For example finetune.unfreeze_at_epoch=2 (null: frozen throughout)."
        )
    if not (is_number(mult) and mult > 0):
        raise MRLError(
            f"finetune.backbone_lr_mult={mult!r} is not valid: it multiplies optim.lr for the backbone's "
            "parameters, a number above 0. For example finetune.backbone_lr_mult=0.1 (1.0: the same lr; "
            "finetune.freeze_backbone=true stops the backbone training)."
        )
    if not freeze_on and (stages or at is not None):
        raise MRLError(
            f"finetune.train_last_stages={stages} / finetune.unfreeze_at_epoch={at} act on a frozen "
            "backbone, but finetune.freeze_backbone=false trains the whole backbone. Add "
            "finetune.freeze_backbone=true, or drop those settings."
        )
    _check_schedule(at, cfg)
    if freeze_on and stages == 0 and at is None:
        _check_something_trains(cfg)


def _check_schedule(at: int | None, cfg: Node) -> None:
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    strategy = strategy.get("_target_", "") if isinstance(strategy, Mapping) else strategy
    if at is not None and "ddp" in str(strategy or "").lower():
        raise MRLError(
            f"finetune.unfreeze_at_epoch={at} with DDP (trainer.strategy={strategy}): "
            "DistributedDataParallel registers the parameters that train when it wraps the model, so a "
            "backbone unfrozen later would train apart on every process, its gradients never averaged. "
            "Under DDP keep the frozen part frozen (finetune.train_last_stages=<N> without "
            "unfreeze_at_epoch), or run the schedule on one device."
        )
    epochs = trainer.get("max_epochs")
    if at is not None and is_int(epochs) and epochs > 0 and at >= epochs:
        raise MRLError(
            f"finetune.unfreeze_at_epoch={at} but the run trains {epochs} epochs "
            f"(trainer.max_epochs={epochs}, counted from 0), so the backbone would never unfreeze. Unfreeze "
            f"it earlier (finetune.unfreeze_at_epoch={epochs - 1} or less), or drop the setting to keep it "
            "frozen."
        )


def _check_something_trains(cfg: Node) -> None:
    """A contrastive objective trains the backbone (and projection) alone: frozen, with no projection,
    its loss has nothing to train."""
    kind = (cfg.get("objective") or {}).get("kind", "ce")
    if kind != "ce" and not (cfg.get("backbone") or {}).get("embed_dim"):
        raise MRLError(
            f"finetune.freeze_backbone=true with objective={kind} leaves nothing for the contrastive loss to "
            "train: it trains the backbone and its projection alone (the head learns from a detached probe), "
            "and this backbone has no projection. Train some stages (finetune.train_last_stages=1), add a "
            "projection (backbone.embed_dim=<size>), or use objective=ce."
        )
