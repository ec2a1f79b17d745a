"""What the commands print: each line once, no third-party adverts or loader chatter, hints that work."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from support import TINY


@pytest.mark.slow
def test_training_console_is_free_of_duplicates_and_noise(run_cli, tmp_path):
    result = run_cli(
        "mrl-train",
        *TINY,
        "evaluate={methods:{adaptive_retrieval:false,baselines:false}}",
        env={"MRL_LOG_DIR": str(tmp_path / "logs with space"), "WANDB_SILENT": "false"},
    )
    assert result.returncode == 0, result.output[-3000:]
    out = result.output
    assert out.count("Seed set to 0") == 1, out  # Lightning's own handler and Hydra's both printed it
    assert out.count("GPU available:") == 1
    assert "litlogger" not in out
    assert "anonymous setting has no effect" not in out
    assert "swigfaiss" not in out and "faiss with AVX" not in out  # faiss's loader, under evaluate=
    for noise in ("set_vital", "LeafSpec", "tight_layout", "not empty"):  # library warnings, not the user's
        assert noise not in out, out
    # stdout is no terminal here: one line per epoch tells the log how training goes
    assert "epoch 1/1: train/loss " in out and "val/acc@" in out, out
    (job,) = (tmp_path / "logs with space" / "train" / "runs").iterdir()
    (wandb_run,) = (job / "wandb").glob("offline-run-*")
    assert f"wandb sync {shlex.quote(str(wandb_run))}" in out  # the path has a space: quoted
    from mrl.eval.locations import find_evaluations

    assert len(find_evaluations(job)) == 1
    assert "epoch 1/1: train/loss " in (job / "train.log").read_text()  # the job's log file too


def test_report_errors_carry_no_hydra_hint(run_main, tmp_path):
    result = run_main("mrl-report", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "is not a directory" in result.stderr
    assert "HYDRA_FULL_ERROR" not in result.output


def test_eval_help_lists_what_mrl_eval_takes(run_main):
    result = run_main("mrl-eval", "--help")
    assert result.returncode == 0
    from mrl.config_path import config_dir

    loggers = sorted(p.stem for p in (Path(config_dir()) / "logger").glob("*.yaml"))
    listed = ", ".join(f"{n} (default)" if n == "wandb" else n for n in loggers)
    assert "csv" in loggers and f"logger: {listed}\n" in result.stdout and "knn:" in result.stdout
    for group in ("backbone:", "head:", "optim:", "sched:", "trainer:", "experiment:"):
        assert f"\n{group} " not in result.stdout, result.stdout[:2000]
    assert "+data.<key>=<value>" in result.stdout


def test_quiet_warnings_drop_library_chatter_only():
    import warnings

    from mrl.logs import quiet_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn_explicit("'set_vital' is deprecated", UserWarning, "x.py", 1, module="torchdata.x")
        warnings.warn_explicit(
            "Checkpoint directory /r exists and is not empty.",
            UserWarning,
            "c.py",
            1,
            module="lightning.pytorch.callbacks",
        )
        warnings.warn_explicit("'set_vital' is deprecated", UserWarning, "y.py", 1, module="mine")
        warnings.warn_explicit("something else", UserWarning, "z.py", 1, module="lightning.pytorch")
    assert [str(w.message) for w in caught] == ["'set_vital' is deprecated", "something else"]


def test_epoch_line_names_loss_smallest_and_largest_size():
    from types import SimpleNamespace

    import torch

    from mrl.training.callbacks import epoch_line

    metrics = {
        "train/loss": torch.tensor(0.41234),
        "val/acc@8": torch.tensor(0.8),
        "val/acc@64": torch.tensor(0.9),
    }
    trainer = SimpleNamespace(callback_metrics=metrics, current_epoch=2, max_epochs=6)
    line = epoch_line(trainer, [8, 16, 64], 12.34)
    assert line == "epoch 3/6: train/loss 0.4123, val/acc@8 80.00%, val/acc@64 90.00%, 12.3 s"
    assert epoch_line(SimpleNamespace(callback_metrics={}, current_epoch=0, max_epochs=1), [8], 1.0) == (
        "epoch 1/1: 1.0 s"
    )
