"""The real `mrl-train` command, end to end on tiny data."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from support import (
    BIN,
    TINY,
    command_env,
    read_results,
    run_command,
    wandb_inspect,
    wandb_metric_definitions,
    wandb_run_dirs,
)

pytestmark = pytest.mark.slow


SWEEP_SIZES = {"mrl": [4, 16, 64], "mrl_e": [4, 16, 64], "ff": [8], "standard": [256]}


@pytest.fixture(scope="module")
def every_head(tmp_path_factory) -> list[Path]:
    """One multirun of every head kind (W&B offline), read by the tests below: its job dirs."""
    tmp = tmp_path_factory.mktemp("every_head")
    args = ["-m", "head=mrl,mrl_e,ff,standard", "head.nesting=[4,16,64]", "head.dim=8", *TINY]
    result = run_command("mrl-train", *args, cwd=tmp)
    assert result.returncode == 0, result.output
    return result.sweep_job_dirs()


def _kind(job: Path) -> str:
    return yaml.safe_load((job / "resolved_config.yaml").read_text())["head"]["kind"]


def _sizes(job: Path) -> list[int]:
    return SWEEP_SIZES[_kind(job)]


def test_every_head_trains_in_one_multirun(every_head):
    assert sorted(map(_kind, every_head)) == sorted(SWEEP_SIZES)
    for job in every_head:
        results = read_results(job)
        sizes = _sizes(job)
        for stage in ("train", "val", "test"):
            for d in sizes:
                assert 0.0 <= results[f"{stage}/acc@{d}"] <= 1.0
        assert {k for k in results if k.startswith("test/acc@")} == {f"test/acc@{d}" for d in sizes}
        assert "val/loss" in results and "train/loss" in results
        assert (job / "acc_vs_size.png").stat().st_size > 1000
        assert (job / "checkpoints" / "last.ckpt").is_file()
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["mrl_nesting"] == sizes


def test_multirun_writes_one_wandb_group_with_size_curves(every_head):
    groups, run_ids = set(), set()
    for job in every_head:
        sizes = _sizes(job)
        runs = wandb_run_dirs(job)
        assert len(runs) == 1, runs
        summary, history = wandb_inspect(runs[0])
        assert summary["state"] == "finished" or summary["exit_code"] == 0
        groups.add(summary["config"]["logger"]["wandb"]["group"])
        run_ids.add(summary["run_id"])
        for d in sizes:
            assert any(f"val/acc@{d}" in row for row in history), f"val/acc@{d} missing from W&B history"
            assert summary["summary"][f"test/acc@{d}"] == pytest.approx(read_results(job)[f"test/acc@{d}"])
        # epoch-level curves over `epoch`, each size's best and last accuracy in the runs table
        definitions = wandb_metric_definitions(runs[0])
        for d in sizes:
            assert definitions[f"val/acc@{d}"]["step_metric"] == "epoch"
            assert definitions[f"val/acc@{d}"]["summary"] == {"max": True, "last": True}
        assert any("epoch" in row for row in history if f"val/acc@{sizes[0]}" in row)
        table_rows = [row for row in history if any(k.startswith("val/acc_vs_size.") for k in row)]
        assert table_rows and table_rows[-1]["val/acc_vs_size.nrows"] == len(sizes)
        assert table_rows[-1]["val/acc_vs_size._type"] == "table-file"
    assert len(groups) == 1 and len(run_ids) == len(every_head)
    assert groups.pop() == every_head[0].parent.name


def test_run_dirs_never_collide(tmp_path):
    """Two jobs started in the same second get two output dirs."""
    env = command_env(tmp_path / "logs")
    args = [
        str(BIN / "mrl-train"),
        "logger=none",
        "test=false",
        *TINY,
        "data.train_size=32",
        "data.val_size=32",
    ]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = sorted((tmp_path / "logs" / "train" / "runs").glob("*"))
    assert len(runs) == 2 and all((r / "results.json").is_file() for r in runs)


def test_fashion_mnist_job_and_terminal_summary(run_cli, tiny_fashion_mnist):
    result = run_cli(
        "mrl-train",
        f"data.data_dir={tiny_fashion_mnist}",
        "data.val_size=100",
        "data.batch_size=50",  # 200 training images: 4 steps (the default batch would drop them all)
        "trainer.max_epochs=1",
        "logger=csv",
        "threads=1",
    )
    assert result.returncode == 0, result.output
    (job,) = result.run_dirs()
    results = read_results(job)
    assert "test/acc@1" in results and "test/acc@256" in results
    assert "Per-size top-1 accuracy" in result.stdout
    assert str(job / "results.json") in result.stdout


def test_backbone_needing_larger_images_gets_resized_data(run_cli, tiny_fashion_mnist):
    result = run_cli(
        "mrl-train",
        "backbone.name=convnext_atto",
        f"data.data_dir={tiny_fashion_mnist}",
        "data.val_size=100",
        "data.batch_size=50",
        "trainer.max_epochs=1",
        "logger=none",
        "threads=1",
    )
    assert result.returncode == 0, result.output
    assert "resizing them to 32" in result.output
    (job,) = result.run_dirs()
    assert "test/acc@320" in read_results(job)


def test_ema_and_compile_options_train(run_cli):
    result = run_cli(
        "mrl-train",
        "callbacks=ema",
        "compile=true",
        "head=mrl_e",
        "head.nesting=[4,32]",
        "logger=none",
        "backbone.name=test_vit",  # compiles faster on the CPU than the default test_byobnet
        *TINY,
        env={"TORCH_LOGS": "recompiles"},
    )
    assert result.returncode == 0, result.output[-3000:]
    # One evaluation graph and one training graph: evaluation must not recompile (see train.py)
    assert result.output.count("Recompiling function forward") == 1, result.output[-3000:]
    (job,) = result.run_dirs()
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # In-place compile keeps parameter names: the checkpoint loads into an uncompiled model.
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert any(k.startswith("EMAWeights") for k in ckpt.get("callbacks", {}))


@pytest.mark.slow
def test_ema_weights_are_the_model_every_result_describes(run_cli):
    """callbacks=ema: results.json's test numbers, the checkpoint, mrl-eval and mrl.load are one model (the
    averaged weights), not the raw training weights in one place and the average in another."""
    import mrl

    result = run_cli(
        "mrl-train",
        "callbacks=ema",
        "callbacks.ema.decay=0.95",
        "logger=none",
        *TINY,
        "data.train_size=512",
        "trainer.max_epochs=2",
        "head.nesting=[4,8,16]",
        "backbone.embed_dim=16",
    )
    assert result.returncode == 0, result.output[-3000:]
    (job,) = result.run_dirs()
    results = read_results(job)
    ckpts = sorted((job / "checkpoints").glob("epoch*.ckpt"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    # the checkpoint holds the average as its model and the raw weights aside; they differ
    assert any(not torch.equal(v, state["current_model_state"][k]) for k, v in state["state_dict"].items())
    evaluated = run_cli(
        "mrl-eval",
        f"ckpt_path={ckpts[-1]}",
        "methods.knn=false",
        "methods.retrieval=false",
        "methods.adaptive_classification=false",
        "methods.adaptive_retrieval=false",
        "methods.baselines=false",
        "logger=none",
    )
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    (out,) = evaluated.run_dirs("eval")
    report = json.loads((out / "report.json").read_text())
    for d in (4, 8, 16):
        assert report["linear"][str(d)]["top1"] == pytest.approx(results[f"test/acc@{d}"], abs=1e-6), d
    model = mrl.load(out / "model.safetensors")
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, state["state_dict"][f"head.{key}"])
