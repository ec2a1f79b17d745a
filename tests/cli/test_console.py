"""What the commands print: each line once, no third-party adverts or loader chatter, hints that work."""

from __future__ import annotations

import shlex

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
    (job,) = (tmp_path / "logs with space" / "train" / "runs").iterdir()
    (wandb_run,) = (job / "wandb").glob("offline-run-*")
    assert f"wandb sync {shlex.quote(str(wandb_run))}" in out  # the path has a space: quoted
    from mrl.eval.locations import find_evaluations

    assert len(find_evaluations(job)) == 1


def test_report_errors_carry_no_hydra_hint(run_main, tmp_path):
    result = run_main("mrl-report", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "is not a directory" in result.stderr
    assert "HYDRA_FULL_ERROR" not in result.output


def test_eval_help_lists_what_mrl_eval_takes(run_main):
    result = run_main("mrl-eval", "--help")
    assert result.returncode == 0
    assert "logger: wandb (default), none" in result.stdout and "knn:" in result.stdout
    for group in ("backbone:", "head:", "optim:", "sched:", "trainer:", "experiment:"):
        assert f"\n{group} " not in result.stdout, result.stdout[:2000]
    assert "+data.<key>=<value>" in result.stdout
