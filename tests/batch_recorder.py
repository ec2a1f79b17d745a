"""A callback for the DDP shard tests: each rank writes a fingerprint of every training image it got (and
its intra-op threads).

Loaded by ``mrl-train`` through ``+callbacks.record._target_=batch_recorder.BatchRecorder`` with this
folder on PYTHONPATH (the DDP worker processes inherit it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x, _ = batch
        prints = [hashlib.sha1(image.detach().cpu().numpy().tobytes()).hexdigest()[:16] for image in x]
        self.seen.setdefault(trainer.current_epoch, []).extend(prints)

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        out = self.path / f"rank{trainer.global_rank}.json"
        # and the intra-op threads the process trained with
        out.write_text(
            json.dumps({"threads": torch.get_num_threads(), **{str(k): v for k, v in self.seen.items()}})
        )
