"""No host-device synchronisation from mrl's code in the training steps that do not log.

Runs a real training job in this process on the CPU with the GPU's policy (``host_reads_are_free``
False: what a CUDA device gets) and records every host read issued from mrl's own frames (see
``host_sync.py``), for each data path: synthetic keys rendered on the device, synthetic uint8 in memory,
shards decoded in the loader, shards decoded in the transfer hook (``decode=gpu``), both heads, and random
sizes per step with depth heads.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from host_sync import HostSyncRecorder
from mrl.config_path import config_dir
from mrl.nn import host_reads
from mrl.resolvers import register_resolvers
from mrl.training.job import train

COMMON = [
    "logger=none",
    "test=false",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=5",
    "trainer.num_sanity_val_steps=0",
    "+trainer.limit_val_batches=1",
    "checkpoint_every_n_steps=1000",
    "backbone.name=test_byobnet",
    "head.nesting=[2,8,64]",
    "threads=1",
]
SYNTHETIC = ["data=synthetic", "data.train_size=192", "data.batch_size=16", "data.img_size=32"]


def shards(path, decode: str) -> list[str]:
    return [
        "data=shards",
        f"data.input_dir={path}",
        f"data.decode={decode}",
        "data.img_size=32",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
    ]


def run(tmp_path, overrides: list[str], monkeypatch) -> HostSyncRecorder:
    register_resolvers()
    record = ["+callbacks.host_sync._target_=host_sync.HostSyncRecorder"]  # a callback like any other
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, *overrides, *record, f"paths.output_dir={tmp_path}"])
    train(cfg)
    return HostSyncRecorder.last


@pytest.fixture(autouse=True)
def gpu_policy(monkeypatch):
    monkeypatch.setattr(host_reads, "host_reads_are_free", lambda device: False)


@pytest.mark.parametrize(
    "case",
    [
        "synthetic",
        "synthetic_in_memory",
        "synthetic_mrl_e",
        "synthetic_sampled_2d",
        "synthetic_supcon",
        "shards_cpu_decode",
        "shards_gpu_decode",
    ],
)
def test_training_steps_read_nothing_back(case, tmp_path, request, monkeypatch):
    if case.startswith("shards"):
        overrides = shards(request.getfixturevalue("tiny_shards"), case.split("_")[1])
    else:
        overrides = [*SYNTHETIC, *(["data.in_memory=true"] if "memory" in case else [])]
        overrides += ["head=mrl_e"] if case.endswith("mrl_e") else []
        # random sizes per step and depth heads (head.sizes_per_step, head.depth_stages)
        overrides += ["head.sizes_per_step=1", "head.depth_stages=[1,2]"] if case.endswith("2d") else []
        # a contrastive objective on two views, with sampled sizes
        overrides += ["objective=supcon", "head.sizes_per_step=1"] if case.endswith("supcon") else []
    recorder = run(tmp_path, overrides, monkeypatch)
    assert recorder.watched >= 8, f"only {recorder.watched} steps were watched"
    assert recorder.events == [], "\n".join(recorder.events)


def test_the_recorder_sees_a_host_read(tmp_path, monkeypatch):
    """The check can fail: with the CPU's policy the fused cross-entropy reads a flag and the non-finite
    guard reads the loss, every step."""
    monkeypatch.setattr(host_reads, "host_reads_are_free", lambda device: True)
    recorder = run(tmp_path, SYNTHETIC, monkeypatch)
    places = {"fused_cross_entropy.py", "safeguards.py"}
    assert {place for place in places if any(place in e for e in recorder.events)} == places
    assert all(any(place in e for place in places) for e in recorder.events), recorder.events


def test_progress_bar_reads_metrics_by_time_not_every_step(tmp_path, monkeypatch):
    """Lightning's own bar reads the logged metrics back after every batch; ours at most once per
    progress_bar_refresh_s (and at each epoch's last batch)."""
    from mrl.training import callbacks

    reads = []
    for bar in (callbacks.TimedRichProgressBar, callbacks.TimedTQDMProgressBar):
        original = bar.get_metrics
        monkeypatch.setattr(bar, "get_metrics", lambda self, *a, _o=original: reads.append(1) or _o(self, *a))
    run(tmp_path, [*SYNTHETIC, "progress_bar_refresh_s=3600"], monkeypatch)
    # 12 training batches: the first and the last batch refresh, and the ends of the training and the
    # validation epoch (Lightning's bar reads at those too)
    assert 1 <= len(reads) <= 4, len(reads)
