"""`mrl-train` with random sizes per step and depth heads, end to end: results.json, what reached W&B, and
the checkpoint in `mrl-eval` and `mrl.load`."""

from __future__ import annotations

import json

import pytest
import torch

from mrl.nn.size_sampling import SizeSampler
from support import (
    TINY,
    read_results,
    run_command,
    wandb_history,
    wandb_metric_definitions,
    wandb_run_dirs,
)

pytestmark = pytest.mark.slow

NESTING = [2, 4, 8, 16]
STAGES = [1, 3]
STEPS = 4  # debug=tiny: 128 training images in batches of 32


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2d")
    proc = run_command(
        "mrl-train",
        *TINY,
        "seed=5",
        f"head.nesting=[{','.join(map(str, NESTING))}]",
        "backbone.embed_dim=16",
        "head.sizes_per_step=1",
        f"head.depth_stages=[{','.join(map(str, STAGES))}]",
        "head.depth_weight=0.5",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = sorted((tmp / "logs" / "train" / "runs").glob("*"))
    return run


def test_results_hold_every_size_the_drawn_fractions_and_the_stage_metrics(job):
    results = read_results(job)
    for stage in ("train", "val", "test"):
        for d in NESTING:
            assert 0.0 <= results[f"{stage}/acc@{d}"] <= 1.0  # evaluation measures every size
            for s in STAGES:
                assert 0.0 <= results[f"{stage}/depth{s}/acc@{d}"] <= 1.0
                assert results[f"{stage}/depth{s}/loss@{d}"] > 0
    # the fractions the run logged are those of the sampler's draws at global steps 0..3 with seed 5
    sampler = SizeSampler(len(NESTING), 1, seed=5)
    expected = torch.stack([sampler.step_weights(step, "cpu") for step in range(STEPS)]).mean(0)
    assert [results[f"train/sampled@{d}"] for d in NESTING] == pytest.approx(expected.tolist())
    assert results[f"train/sampled@{NESTING[-1]}"] == 1.0


def test_wandb_got_the_new_keys_beside_the_usual_ones(job):
    (run,) = wandb_run_dirs(job)
    keys = set().union(*wandb_history(run))
    for d in NESTING:
        assert {f"val/acc@{d}", f"train/acc@{d}", f"train/sampled@{d}"} <= keys
        for s in STAGES:
            assert {f"val/depth{s}/acc@{d}", f"train/depth{s}/loss@{d}", f"test/depth{s}/acc@{d}"} <= keys
    # the stages' accuracy curves are plotted against `epoch` and summarised by best and last, as the
    # final stage's are
    definitions = wandb_metric_definitions(run)
    for d in NESTING:
        stage_keys = [f"{split}/depth{s}/acc@{d}" for s in STAGES for split in ("train", "val")]
        for key in [f"val/acc@{d}", *stage_keys]:
            assert definitions[key]["step_metric"] == "epoch", key
            assert definitions[key]["summary"] == {"max": True, "last": True}, key


def test_the_checkpoint_loads_in_mrl_eval_and_mrl_load(job, run_cli):
    import mrl
    from mrl.eval.model import load_for_eval

    ckpt = job / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("depth.heads.") for k in state)  # the stage heads are in the checkpoint
    module, _, _ = load_for_eval(ckpt)  # what mrl-eval rebuilds: strict load, stage heads included
    loaded = mrl.load(ckpt)  # the deployable model: backbone and head only
    assert not any(k.startswith("depth") for k in loaded.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), module(x), atol=1e-6)
    result = run_cli(
        "mrl-eval",
        f"ckpt_path={ckpt}",
        "threads=1",
        "logger=none",
        "methods.adaptive_classification=false",
        "methods.adaptive_retrieval=false",
        "methods.baselines=false",
    )
    assert result.returncode == 0, result.output[-3000:]
    (out,) = result.run_dirs("eval")
    report = json.loads((out / "report.json").read_text())
    assert [int(d) for d in report["sizes"]] == NESTING


BAD = [
    (["head.sizes_per_step=-1"], ["head.sizes_per_step=-1 is not valid", "an integer >= 0"]),
    (
        ["head.nesting=[4,8,16]", "head.sizes_per_step=3"],
        [
            "head.sizes_per_step=3 is more than the head's other sizes",
            "at most 2",
            "head.sizes_per_step=null",
        ],
    ),
    (["head.depth_stages=2"], ["head.depth_stages=2 is not valid", "distinct stage indices", "[2,3]"]),
    (["head.depth_weight=-1"], ["head.depth_weight=-1 is not valid", "a number >= 0"]),
    # judged once the backbone is built: the message lists its stages
    (
        ["head.depth_stages=[1,9]"],
        [
            "head.depth_stages=[1, 9] is not valid for backbone 'test_byobnet'",
            "0 (stem, 24 channels)",
            "final_conv",
        ],
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[" ".join(c[0]) for c in BAD])
def test_bad_settings_are_explained_before_training(run_main, overrides, expected):
    result = run_main("mrl-train", *TINY, "logger=none", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    assert "Epoch 0" not in result.output  # refused before any training step
    for text in expected:
        assert text in result.output, result.output
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))
