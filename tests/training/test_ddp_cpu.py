"""trainer=ddp_cpu: two gloo processes, one output dir, one W&B run, metrics equal a single process."""

import pytest
import torch
from omegaconf import OmegaConf

from mrl.instantiate import instantiate
from mrl.training.assemble import build_module
from support import TINY, read_results, wandb_inspect, wandb_run_dirs

pytestmark = pytest.mark.slow


def single_process_accuracies(job_dir, split: str) -> dict[int, float]:
    """Evaluate the saved weights in this process with a plain loop (no Lightning, no DDP)."""
    cfg = OmegaConf.load(job_dir / "resolved_config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    module = build_module(cfg, datamodule.num_classes, datamodule.in_chans, datamodule.img_size)
    ckpt = torch.load(job_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    correct = torch.zeros(len(module.nesting))
    total = 0
    with torch.inference_mode():
        for batch in datamodule.split_loader(split):
            x, y = datamodule.model_inputs(batch)
            logits = module.logits(x)
            correct += (logits.argmax(-1) == y).sum(dim=1)
            total += len(y)
    return {d: float(c) / total for d, c in zip(module.nesting, correct, strict=True)}


def test_ddp_cpu_matches_single_process(run_cli):
    result = run_cli("mrl-train", "trainer=ddp_cpu", "head.nesting=[2,8,256]", *TINY)
    assert result.returncode == 0, result.output
    runs = result.run_dirs()
    assert len(runs) == 1, f"DDP workers must not create output dirs of their own: {runs}"
    assert not (result.log_dir / "train" / "multiruns").exists()
    (job,) = runs
    wandb_runs = wandb_run_dirs(job)
    assert len(wandb_runs) == 1
    summary, _ = wandb_inspect(wandb_runs[0])
    assert summary["config"]["trainer"]["devices"] == 2

    results = read_results(job)
    expected = single_process_accuracies(job, "val")
    for d, acc in expected.items():
        assert results[f"val/acc@{d}"] == pytest.approx(acc, abs=1e-6), d
