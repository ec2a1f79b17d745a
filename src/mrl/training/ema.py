"""``callbacks=ema``: an exponential moving average of the weights, the one model every result describes."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, used by every evaluation of the model.

    Lightning validates with the averaged weights and saves them as the checkpoint's ``state_dict`` (so
    ``mrl-eval`` and ``mrl.load`` use them), but whenever it loads a checkpoint while the average exists
    it puts the raw training weights (``current_model_state``) back into the model. That is right when
    resuming training and wrong for ``trainer.test(ckpt_path="best")`` after fitting: the test then
    measured the raw weights, and ``results.json`` described another model than the checkpoint. Outside
    fitting, the checkpoint's averaged weights stay loaded.
    """

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
