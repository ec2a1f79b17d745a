"""The LightningModule: backbone -> embedding z -> Matryoshka head -> per-size logits -> loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from mrl.models.backbone import TimmBackbone
from mrl.models.depth import DepthMatryoshka
from mrl.models.spec import ModelSpec
from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.tracking.charts import log_accuracy_vs_size
from mrl.training.checkpoints import SPEC_KEY
from mrl.training.epoch_metrics import EpochMetrics
from mrl.training.finetune import optimizer_kwargs
from mrl.training.safeguards import NonFiniteGuard, sync_buffers_from_rank_zero
from mrl.training.schedules import per_update_scheduler


class MatryoshkaLitModule(L.LightningModule):
    """Trains a backbone and a Matryoshka head with the Matryoshka objective ``loss``.

    ``loss`` (:class:`MatryoshkaLoss`: ``head.weights`` and, with ``head.sizes_per_step``, a size draw per
    training batch) weighs every per-size loss of a step: its own (the head's cross-entropy, or a
    contrastive loss on the embedding), the depth heads' and the probe's. Logs ``{stage}/loss`` (the final
    head's) and the per-size metrics of :class:`EpochMetrics`; evaluation always measures every size.

    ``depth``: Matryoshka heads on earlier backbone stages (``head.depth_stages``), their loss added to
    the minimised one. With a contrastive objective, training batches hold several views ``(V, B, C, H,
    W)``: the backbone learns from the contrastive loss alone (``train/contrastive_loss``), the head from
    ``probe`` (its cross-entropy), an online linear probe on the detached embedding of every view, so
    ``{stage}/acc@{d}`` and ``{stage}/loss`` keep their meaning: the head's.

    ``optimizer`` is a partial taking the module (timm's ``create_optimizer_v2``: it keeps weight decay
    off biases and norms), ``scheduler`` a partial taking the optimizer and ``num_epochs`` /
    ``updates_per_epoch`` (timm's ``create_scheduler_v2``), stepped after every optimizer update.
    ``config`` (the run's resolved config) is stored in every checkpoint so evaluation can rebuild it.
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        head: MatryoshkaLinear,
        loss: MatryoshkaLoss,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        config: dict[str, Any] | None = None,
        depth: DepthMatryoshka | None = None,
        probe: MatryoshkaCrossEntropy | None = None,
        spec: ModelSpec | None = None,
        backbone_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.criterion = loss
        self.depth = depth
        self.probe = probe
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.channels_last, self.compile_backbone = channels_last, compile
        self.config, self.spec = config or {}, spec  # the run's config, the model's description (ModelSpec)
        self.backbone_lr_mult = backbone_lr_mult  # finetune.backbone_lr_mult: the timm model's lr / optim.lr
        self.nesting = list(head.nesting)
        self._nonfinite = NonFiniteGuard()
        self.has_top5 = head.num_classes >= 5
        self.epoch_metrics = EpochMetrics(self.nesting, self.has_top5, contrastive=probe is not None)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def configure_model(self) -> None:
        if self.compile_backbone and not getattr(self, "_compiled", False):
            # In-place compile keeps parameter names, so checkpoints load into uncompiled models. It
            # covers the depth heads' stage maps too: they come from the backbone's own call.
            self.backbone.compile()
            self._compiled = True

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding ``z`` of shape ``(B, embed_dim)``."""
        return self.backbone(self._prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-size logits ``(G, B, C)``."""
        return self.head(self(x))

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, log_loss: bool = True
    ) -> torch.Tensor:
        x, y = batch
        training = stage == "train" and torch.is_grad_enabled()
        # The sizes this training batch trains (None: every size), one draw for all its losses (a device
        # tensor: no host sync); the per-size losses logged stay those of every size.
        sizes = self.criterion.draw(self.global_step, y.device) if training else None
        contrastive = None
        if training and self.probe is not None:
            z, stage_z, y, contrastive = self._contrastive_step(x, y, sizes, log_loss)
        elif self.depth is not None:  # the earlier stages' embeddings too, from the same backbone pass
            z, stage_z = self.depth.embed(self.backbone, self._prepare(x))
        else:
            z, stage_z = None, []  # the head's losses come from x: _per_size_and_scores_of_inputs
        head_loss = self.criterion.per_size_loss if self.probe is None else self.probe
        if z is None:
            per_size, scores = self._per_size_and_scores_of_inputs(head_loss, x, y, training)
        else:
            per_size, scores = head_loss.per_size_and_scores(self.head, z, y, logits=not training)
        # The probe trains on the detached embedding: masking its sizes would save no backbone work and
        # only leave the small sizes' probes behind, so it trains every size.
        loss = self.criterion.combine(per_size, sizes if self.probe is None else None)
        # {stage}/loss stays the final head's loss (the exported model's; val/loss picks the best
        # checkpoint); the stage heads' losses are added to what is minimised and logged per size.
        depth_loss = None if self.depth is None else self.depth.step_loss(stage_z, y, stage, sizes)
        if log_loss:
            log_head_loss(self, stage, loss, y.shape[0])
        self.epoch_metrics.update(stage, per_size, y, scores.detach())
        for extra in (depth_loss, contrastive):
            loss = loss if extra is None else loss + extra
        return loss

    def _per_size_and_scores_of_inputs(
        self, head_loss: MatryoshkaCrossEntropy, x: torch.Tensor, y: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's per-size losses and scores (``per_size_and_scores``) on the embedding of the batch's
        inputs ``x``; a subclass may compute them without forming the embedding."""
        return head_loss.per_size_and_scores(self.head, self(x), y, logits=not training)

    def _contrastive_step(
        self, x: torch.Tensor, y: torch.Tensor, sizes: torch.Tensor | None, log_loss: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(z for the probe, no stage embeddings, the probe's targets, the contrastive loss)`` of a
        training batch of views ``(V, B, ...)``, which go through the backbone as one batch; the probe
        sees the embedding detached (stop-gradient). (Config checks refuse depth heads beside it.)"""
        self.criterion.per_size_loss.check_views(x)
        z = self(x.flatten(0, 1))
        per_size = self.criterion.per_size(z, y)
        loss = self.criterion.combine(per_size, sizes)
        if log_loss:
            self.log("train/contrastive_loss", loss, on_step=True, on_epoch=False, batch_size=y.shape[0])
        self.epoch_metrics.update_contrastive(per_size, y)
        return z.detach(), [], y.repeat(x.shape[0]), loss

    def _log_epoch_metrics(self, stage: str, chart: bool = False) -> None:
        """Log the epoch's per-size metrics of ``stage`` (on every process: computing them synchronises
        the processes' states) and, with ``chart``, its accuracy-vs-size chart."""
        values = self.epoch_metrics.compute(stage, self.depth, self.criterion.sampler)
        full = f"{stage}/acc@{self.nesting[-1]}"
        for key, value in values.items():
            self.log(key, value, prog_bar=stage != "train" and key == full)
        if chart and self.trainer.is_global_zero:
            top1 = [values[f"{stage}/acc@{d}"].item() for d in self.nesting]
            log_accuracy_vs_size(
                self.loggers, stage, self.nesting, top1, self.global_step, self.current_epoch
            )

    def _logger_writes_this_step(self, batch_idx: int) -> bool:
        """Whether to log step metrics now: where the loggers write them (every ``log_every_n_steps``)
        and at each epoch's last batch (so ``train/loss`` always reaches the results). Each ``self.log``
        call costs Python time, and values logged on the other steps are overwritten unseen
        (benchmarks/platform_overhead.py; benchmarks/README.md, "Platform overhead")."""
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        last = batch_idx + 1 >= self.trainer.num_training_batches
        return (self.global_step + 1) % every == 0 or last

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        log_now = self._logger_writes_this_step(batch_idx)
        loss = self._shared_step(batch, "train", log_loss=log_now)
        self._nonfinite.observe(loss)  # read back only where the host waits anyway
        if log_now:
            self.log(
                "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False
            )
            self._nonfinite.check(self.global_step)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        sync_buffers_from_rank_zero(self, self.trainer.world_size)

    def on_test_epoch_start(self) -> None:
        sync_buffers_from_rank_zero(self, self.trainer.world_size)

    def on_train_epoch_end(self) -> None:
        self._nonfinite.check(self.global_step)
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", chart=not self.trainer.sanity_checking)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", chart=True)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("MatryoshkaLitModule needs an optimizer factory to train")
        extra = optimizer_kwargs(self.optimizer_factory, self.backbone.model, self.backbone_lr_mult)
        optimizer = self.optimizer_factory(self, **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = per_update_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers are stepped by update count (warmup + cosine per update), not by epoch.
        scheduler.step_update(num_updates=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write weights trained through a non-finite loss: the last good checkpoint stays.
        self._nonfinite.check(self.global_step)
        checkpoint["mrl_config"] = self.config
        checkpoint["mrl_nesting"] = self.nesting
        checkpoint[SPEC_KEY] = self.spec.to_dict() if self.spec is not None else None


def log_head_loss(module: L.LightningModule, stage: str, loss: torch.Tensor, batch_size: int) -> None:
    """``{stage}/loss``, the head's: per step in training (the key stays plain), per epoch otherwise."""
    on_step = stage == "train"
    module.log(
        f"{stage}/loss",
        loss,
        on_step=on_step,
        on_epoch=not on_step,
        sync_dist=not on_step,
        prog_bar=True,
        batch_size=batch_size,
    )
