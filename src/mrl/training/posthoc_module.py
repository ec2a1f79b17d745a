"""The LightningModule of heads trained on a frozen source's cached features (``mrl-train source=``)."""

from __future__ import annotations

import torch

from mrl.models.posthoc import PosthocBackbone, Projection
from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.feature_head_objective import FeatureHeadObjective
from mrl.nn.sparse_autoencoder import SparseAutoencoder
from mrl.training.epoch_metrics import EpochMetrics
from mrl.training.module import MatryoshkaLitModule, log_head_loss


class PosthocLitModule(MatryoshkaLitModule):
    """:class:`MatryoshkaLitModule` on batches of frozen features ``(B, F)`` instead of images.

    The backbone is a :class:`~mrl.models.posthoc.PosthocBackbone`; only its feature head runs on the
    cached features (the source computed them once). With a projection (``head=mrl|mrl_e|ff``) the step
    is the end-to-end one on ``z = projection(features)``. With CSR or the adaptor the feature head
    trains with its own per-size losses (``train/{kind}_loss`` and ``@{d}``, weighed by the run's
    :class:`~mrl.nn.matryoshka_loss.MatryoshkaLoss`) and the Matryoshka head is a probe on the detached
    ``z`` whose cross-entropy gives ``{stage}/loss`` and ``{stage}/acc@{d}`` their usual meaning. CSR
    also logs ``train/dead_fraction``, the fraction of its units the auxiliary-k rule counts as dead.
    Images (``mrl-eval``, tests) still go through the whole chain. A projection's training step on
    cached features may fold its last linear map into the Matryoshka head instead of forming ``z``
    (:meth:`MatryoshkaCrossEntropy.per_size_from_projection`; the same losses and gradients).
    """

    backbone: PosthocBackbone

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kind = (
            self.spec.feature_head.kind if self.spec is not None and self.spec.feature_head else "projection"
        )
        self.feature_kind = kind
        if self.probe is not None:
            self.epoch_metrics = EpochMetrics(
                self.nesting, self.has_top5, contrastive=True, objective_loss=f"{kind}_loss"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z`` of cached features ``(B, F)``, or of images through the frozen source."""
        return self.backbone.encode_features(x) if x.dim() == 2 else self.backbone(self._prepare(x))

    def _per_size_and_scores_of_inputs(
        self, head_loss: MatryoshkaCrossEntropy, x: torch.Tensor, y: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self.backbone.feature_head
        foldable = isinstance(projection, Projection) and isinstance(head_loss, MatryoshkaCrossEntropy)
        if not (training and x.dim() == 2 and foldable):
            return super()._per_size_and_scores_of_inputs(head_loss, x, y, training)
        body, last = projection.split_last()
        h = x if body is None else body(x)
        return head_loss.per_size_from_projection(self.head, last, h, y, predict=True)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, log_loss: bool = True
    ) -> torch.Tensor:
        if self.probe is None:
            return super()._shared_step(batch, stage, log_loss)
        features, y = batch
        training = stage == "train" and torch.is_grad_enabled()
        objective = self.criterion.per_size_loss
        assert isinstance(objective, FeatureHeadObjective)
        objective.step = self.global_step if training else None
        sizes = self.criterion.draw(self.global_step, y.device) if training else None
        loss = None
        if training:
            per_size = self.criterion.per_size(features, y)
            loss = self.criterion.combine(per_size, sizes)
            self.epoch_metrics.update_contrastive(per_size.detach(), y)
            if log_loss:
                self.log(
                    f"train/{self.feature_kind}_loss", loss, on_step=True, on_epoch=False, batch_size=len(y)
                )
                head = self.backbone.feature_head
                if isinstance(head, SparseAutoencoder):
                    self.log("train/dead_fraction", head.dead_fraction(), on_step=True, on_epoch=True)
        with torch.no_grad():
            z = self(features)
        per_size, scores = self.probe.per_size_and_scores(self.head, z, y, logits=not training)
        probe_loss = self.criterion.combine(per_size, None)
        if log_loss:
            log_head_loss(self, stage, probe_loss, y.shape[0])
        self.epoch_metrics.update(stage, per_size, y, scores.detach())
        return probe_loss if loss is None else loss + probe_loss
