"""What a training job sets in its process before training: the CUDA check that Lightning's import made
slow on hosts without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from mrl.training.job import NVML_CUDA_CHECK, plain_cuda_check_without_gpus
from support import TINY


@pytest.mark.parametrize("gpu", [False, True])
def test_the_nvml_check_is_turned_off_only_without_a_gpu(monkeypatch, gpu):
    monkeypatch.setenv(NVML_CUDA_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    plain_cuda_check_without_gpus()
    assert os.environ[NVML_CUDA_CHECK] == ("1" if gpu else "0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="about hosts without a CUDA GPU")
def test_training_steps_on_a_host_without_a_gpu_never_load_nvml(run_main, monkeypatch):
    """torch's optimizers ask whether CUDA is there at every step; with the NVML-based check that
    Lightning turns on, each answer loads NVML again (torch caches it only once CUDA is initialised)."""
    calls = []
    nvml_count = torch.cuda._device_count_nvml
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: calls.append(1) or nvml_count())
    # as Lightning's import leaves it in a fresh process (this one may have imported Lightning long ago)
    lightning_set = {NVML_CUDA_CHECK: "1"}
    result = run_main(
        "mrl-train", *TINY, "logger=none", "test=false", "trainer.max_epochs=3", env=lightning_set
    )
    assert result.returncode == 0, result.output[-2000:]
    steps = 3 * 128 // 32
    assert len(calls) < steps, f"NVML was loaded {len(calls)} times in a run of {steps} steps"
