"""The LightningModule: backbone -> embedding z -> Matryoshka head -> per-size logits -> loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from mrl.models.backbone import TimmBackbone
from mrl.models.depth import DepthMatryoshka
from mrl.models.spec import ModelSpec
from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy
from mrl.nn.matryoshka_contrastive import MatryoshkaContrastiveLoss
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.size_sampling import SizeSampler
from mrl.tracking.charts import log_accuracy_vs_size
from mrl.training.checkpoints import SPEC_KEY

STAGES = ("train", "val", "test")


class MatryoshkaLitModule(L.LightningModule):
    """Trains a backbone and a Matryoshka head with the Matryoshka loss.

    Logs, per size ``d`` of the head's nesting list, ``{stage}/acc@{d}`` (top-1) and, with at least 5
    classes, ``val/top5@{d}`` and ``test/top5@{d}``, plus ``{stage}/loss`` (the weighted sum over sizes) and
    ``{stage}/loss@{d}``. Accuracies are torchmetrics objects, so they are synchronised across DDP
    processes when computed.

    ``optimizer`` is a partial taking the module (timm's ``create_optimizer_v2``: it keeps weight decay
    off biases and norms), ``scheduler`` a partial taking the optimizer and ``num_epochs`` /
    ``updates_per_epoch`` (timm's ``create_scheduler_v2``), stepped after every optimizer update.
    ``config`` (the run's resolved config) is stored in every checkpoint so evaluation can rebuild it.

    Optional training helpers: ``size_sampler`` trains the full size plus a random few others each step
    (``head.sizes_per_step``; logs ``train/sampled@{d}``, the fraction of steps that trained size ``d``);
    ``depth`` adds Matryoshka heads on earlier backbone stages (``head.depth_stages``; logs
    ``{stage}/depth{s}/acc@{d}`` and ``loss@{d}``; their loss is added to the minimised one while
    ``{stage}/loss`` stays the final head's). Evaluation always measures every size.

    With a contrastive ``objective`` (``objective=supcon|infonce``) training batches hold several views
    ``(V, B, C, H, W)``: the backbone is trained by the Matryoshka contrastive loss alone, logged as
    ``train/contrastive_loss`` and ``train/contrastive_loss@{d}``, and the head is an online linear probe
    on the detached embedding of every view (its cross-entropy reaches the head, never the backbone), so
    ``{stage}/acc@{d}`` and ``{stage}/loss`` keep their meaning: the head's.
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
        size_sampler: SizeSampler | None = None,
        depth: DepthMatryoshka | None = None,
        objective: MatryoshkaContrastiveLoss | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec  # the model's description, stored in every checkpoint beside the config
        self.backbone = backbone
        self.head = head
        self.criterion = loss
        self.size_sampler = size_sampler
        self.depth = depth
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.compile_backbone = compile
        self.config = config or {}
        self.nesting = list(head.nesting)
        # set once a training loss is nan/inf (a device tensor: see training_step)
        self._nonfinite: torch.Tensor | None = None
        num_classes = head.num_classes
        top5 = num_classes >= 5
        # One metric per stage holds every size's counts (see MatryoshkaAccuracy for why not one per size).
        self.metrics = nn.ModuleDict()
        for stage in STAGES:
            self.metrics[f"{stage}_acc"] = MatryoshkaAccuracy(len(self.nesting), top_k=1)
            if top5 and stage != "train":
                self.metrics[f"{stage}_top5"] = MatryoshkaAccuracy(len(self.nesting), top_k=5)
        self.has_top5 = top5
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_counts: dict[str, int] = {}
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def configure_model(self) -> None:
        if self.compile_backbone and not getattr(self, "_compiled", False):
            # In-place compile keeps parameter names, so checkpoints load into uncompiled models.
            self.backbone.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding ``z`` of shape ``(B, embed_dim)``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-size logits ``(G, B, C)``."""
        return self.head(self(x))

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``z`` and, with ``depth``, the earlier stages' embeddings (from the same backbone pass)."""
        if self.depth is None:
            return self(x), []
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.depth.embed(self.backbone, x)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, log_loss: bool = True
    ) -> torch.Tensor:
        x, y = batch
        training = stage == "train" and torch.is_grad_enabled()
        # Size sampling weighs this step's undrawn sizes by 0 (a device tensor: no host sync), in every
        # per-size loss that is minimised; the per-size losses logged below stay those of every size.
        sampled = self.size_sampler is not None and training
        size_weights = self.size_sampler.step_weights(self.global_step, y.device) if sampled else None
        contrastive = None
        if training:
            z, stage_z, y, contrastive = self._training_embedding(x, y, log_loss, size_weights)
            # Training needs only the losses and each size's top-1 class: head and cross-entropy run as
            # one node (fused=True), without keeping the (G, B, C) logits for the metrics.
            per_size, scores = self.criterion.per_size_from_embedding(self.head, z, y, predict=True)
        else:
            z, stage_z = self._embed(x)
            scores = self.head(z)  # evaluation keeps the logits: top-5 accuracy needs them
            per_size = self.criterion.per_size(scores, y)
        # A contrastive objective's probe trains on the detached embedding: masking its sizes would save
        # no backbone work and only leave the small sizes' probes behind, so it trains every size.
        probe_weights = None if self.objective is not None else size_weights
        loss = self.criterion.combine(self._weighted(per_size, probe_weights))
        # {stage}/loss stays the final head's loss (the exported model's; val/loss picks the best
        # checkpoint); the stage heads' losses are added to what is minimised and logged per size.
        depth_loss = None if self.depth is None else self.depth.step_loss(stage_z, y, stage, size_weights)
        on_step = stage == "train"
        # train/loss is logged per step (the key stays plain "train/loss"); eval losses per epoch.
        if log_loss:
            self.log(
                f"{stage}/loss",
                loss,
                on_step=on_step,
                on_epoch=not on_step,
                sync_dist=not on_step,
                prog_bar=True,
                batch_size=y.shape[0],
            )
        # Per-size metrics are only accumulated here and logged once per epoch (_log_epoch_metrics):
        # a self.log call per size per step would cost more than the model on a small network.
        detached = scores.detach()  # (G, B, C) logits or (G, B) top-1 classes: accuracy takes either
        self._loss_sums[stage] = self._loss_sums.get(stage, 0) + per_size.detach() * y.shape[0]
        self._loss_counts[stage] = self._loss_counts.get(stage, 0) + y.shape[0]
        self.metrics[f"{stage}_acc"].update(detached, y)
        if self.has_top5 and stage != "train":
            self.metrics[f"{stage}_top5"].update(detached, y)
        for extra in (depth_loss, contrastive):
            loss = loss if extra is None else loss + extra
        return loss

    @staticmethod
    def _weighted(per_size: torch.Tensor, size_weights: torch.Tensor | None) -> torch.Tensor:
        """The per-size losses with this step's sampled sizes only (the others weigh 0)."""
        return per_size if size_weights is None else per_size * size_weights

    def _training_embedding(
        self, x: torch.Tensor, y: torch.Tensor, log_loss: bool, size_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """``(z for the head, the earlier stages' embeddings, the head's targets, the contrastive loss
        or None)`` of a training batch.

        With a contrastive objective the views ``(V, B, ...)`` go through the backbone as one batch; the
        head sees the embedding detached (stop-gradient: an online linear probe). Depth heads train with
        cross-entropy only, so the config checks refuse them beside a contrastive objective.
        """
        if self.objective is None:
            z, stage_z = self._embed(x)
            return z, stage_z, y, None
        if x.dim() != 5 or x.shape[0] != self.objective.views:
            raise RuntimeError(
                f"objective={self.objective.kind} needs {self.objective.views} views per training batch "
                f"(V, B, C, H, W), got a batch of shape {tuple(x.shape)}: the datamodule was not given "
                "objective.views (datamodule.configure_views)"
            )
        z = self(x.flatten(0, 1))
        per_size = self.objective.per_size(z, y)
        # One place combines per-size losses with the relative weights c_m: the criterion's.
        loss = self.criterion.combine(self._weighted(per_size, size_weights))
        if log_loss:
            self.log("train/contrastive_loss", loss, on_step=True, on_epoch=False, batch_size=y.shape[0])
        key = "train_contrastive"
        self._loss_sums[key] = self._loss_sums.get(key, 0) + per_size.detach() * y.shape[0]
        self._loss_counts[key] = self._loss_counts.get(key, 0) + y.shape[0]
        return z.detach(), [], y.repeat(x.shape[0]), loss

    def _log_epoch_metrics(self, stage: str) -> list[float]:
        """Log ``{stage}/acc@{d}``, ``top5@{d}`` and ``loss@{d}`` for the epoch; return top-1 per size.

        ``compute()`` synchronises the torchmetrics states across DDP processes, so every rank calls it.
        """
        sums, count = self._loss_sums.pop(stage, None), self._loss_counts.pop(stage, 0)
        top1 = self._compute_and_reset(f"{stage}_acc")
        top5 = self._compute_and_reset(f"{stage}_top5") if self.has_top5 and stage != "train" else None
        for g, d in enumerate(self.nesting):
            self.log(f"{stage}/acc@{d}", top1[g], prog_bar=stage != "train" and g == len(self.nesting) - 1)
            if top5 is not None:
                self.log(f"{stage}/top5@{d}", top5[g])
            if sums is not None:
                self.log(f"{stage}/loss@{d}", sums[g] / count, sync_dist=True)
        self._log_helper_metrics(stage)
        return top1.tolist()

    def _log_helper_metrics(self, stage: str) -> None:
        """The epoch's metrics of the optional training helpers (size sampling, depth heads)."""
        if self.depth is not None:
            accuracies, losses = self.depth.epoch_metrics(stage)
            for key, value in accuracies.items():
                self.log(key, value)
            for key, value in losses.items():
                self.log(key, value, sync_dist=True)
        fractions = self.size_sampler.drawn_fractions() if self.size_sampler and stage == "train" else None
        for d, fraction in zip(self.nesting, [] if fractions is None else fractions, strict=False):
            self.log(f"train/sampled@{d}", fraction)

    def _compute_and_reset(self, name: str) -> torch.Tensor:
        metric = self.metrics[name]
        values = metric.compute().reshape(-1)  # torchmetrics squeezes a one-size head's (1,) to a scalar
        metric.reset()
        return values

    def _logger_writes_this_step(self, batch_idx: int) -> bool:
        """Whether to log step metrics now: where the loggers write them (every ``log_every_n_steps``)
        and at each epoch's last batch (so ``train/loss`` always reaches the results).

        Each ``self.log`` call costs Python time, and values logged on the other steps are overwritten
        unseen (benchmarks/platform_overhead.py; benchmarks/README.md, "Platform overhead").
        """
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        last = batch_idx + 1 >= self.trainer.num_training_batches
        return (self.global_step + 1) % every == 0 or last

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        log_now = self._logger_writes_this_step(batch_idx)
        loss = self._shared_step(batch, "train", log_loss=log_now)
        if log_now:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, on_epoch=False)
        # Flagged on the device and read back only where we look anyway (logging steps, before a
        # checkpoint is written, epoch end): `if not torch.isfinite(loss)` on every step would make a GPU
        # wait for the host each step.
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if log_now:
            self._raise_if_nonfinite()
        return loss

    def _raise_if_nonfinite(self) -> None:
        """Stop training once a non-finite loss was seen (the flag syncs the device here only)."""
        if self._nonfinite is not None and bool(self._nonfinite):
            raise FloatingPointError(
                f"The training loss became nan or inf at or before step {self.global_step}. Lower optim.lr, "
                "enable gradient clipping (trainer.gradient_clip_val=1.0) or use precision=32; the last good "
                "checkpoint is kept in the run's checkpoints/ folder."
            )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _sync_buffers_from_rank_zero(self) -> None:
        # Under DDP every process updates its own BatchNorm running statistics after the last
        # broadcast, so evaluation would mix slightly different models. Evaluating everywhere with rank
        # zero's buffers (the ones the checkpoint stores) makes DDP metrics equal a single-process run.
        if (
            self.trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            for buffer in self.buffers():
                if buffer.is_floating_point():
                    torch.distributed.broadcast(buffer.data, src=0)

    def on_validation_epoch_start(self) -> None:
        self._sync_buffers_from_rank_zero()

    def on_test_epoch_start(self) -> None:
        self._sync_buffers_from_rank_zero()

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite()
        self._log_epoch_metrics("train")
        sums = self._loss_sums.pop("train_contrastive", None)
        count = self._loss_counts.pop("train_contrastive", 0)
        for g, d in enumerate(self.nesting if sums is not None else ()):
            self.log(f"train/contrastive_loss@{d}", sums[g] / count, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        accs = self._log_epoch_metrics("val")
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log_accuracy_vs_size(
                self.loggers, "val", self.nesting, accs, self.global_step, self.current_epoch
            )

    def on_test_epoch_end(self) -> None:
        accs = self._log_epoch_metrics("test")
        if self.trainer.is_global_zero:
            log_accuracy_vs_size(
                self.loggers, "test", self.nesting, accs, self.global_step, self.current_epoch
            )

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("MatryoshkaLitModule needs an optimizer factory to train")
        optimizer = self.optimizer_factory(self)
        if self.scheduler_factory is None:
            return optimizer
        num_epochs = max(1, self.trainer.max_epochs or 1)
        updates_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / num_epochs))
        scheduler, _ = self.scheduler_factory(
            optimizer, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch, step_on_epochs=False
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers are stepped by update count (warmup + cosine per update), not by epoch.
        scheduler.step_update(num_updates=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write weights trained through a non-finite loss: the last good checkpoint stays.
        self._raise_if_nonfinite()
        checkpoint["mrl_config"] = self.config
        checkpoint["mrl_nesting"] = self.nesting
        if self.spec is not None:
            checkpoint[SPEC_KEY] = self.spec.to_dict()
