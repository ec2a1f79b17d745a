"""Places a command cannot write, and records it cannot read, are one paragraph before any work: an
``MRL_LOG_DIR`` that is a file or read-only, ``mrl-report --out <a file>``, ``mrl-dashboard --out <a
folder>``, a corrupt ``.hydra/overrides.yaml``, and ``mrl-eval`` without its checkpoint."""

from __future__ import annotations

import os

import pytest

from support import top1_results, write_job_dir

AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")


def _assert_clear_failure(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, result.output[-3000:]


def _unusable(tmp_path, kind: str):
    """A log dir that is a file, or a read-only directory."""
    if kind == "file":
        place = tmp_path / "a_file"
        place.write_text("")
        return place, "is a file, not a directory"
    place = tmp_path / "read_only"
    place.mkdir(mode=0o555)
    return place, "is not writable"


COMMANDS = {
    "mrl-eval": lambda tmp: [f"ckpt_path={tmp / 'run' / 'last.ckpt'}", "logger=none"],
    "mrl-prepare-data": lambda tmp: [f"root={tmp / 'tree'}", f"output_dir={tmp / 'shards'}"],
}


@pytest.mark.parametrize("kind", ["file", pytest.param("read_only", marks=AS_ROOT)])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unusable_log_dir_is_refused_before_anything(run_main, tmp_path, command, kind):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_bytes(b"PK\x03\x04 the checkpoint is not read before this")
    place, reason = _unusable(tmp_path, kind)
    result = run_main(command, *COMMANDS[command](tmp_path), env={"MRL_LOG_DIR": str(place)})
    _assert_clear_failure(result, f"the output directory {place}", reason, "MRL_LOG_DIR=<dir>")
    assert not (tmp_path / "shards").exists()


@AS_ROOT
def test_a_read_only_run_is_not_resumed_in_place(run_main, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text("seed: 0\n")  # judged before it is read
    run.chmod(0o555)
    result = run_main("mrl-train", f"resume={run}")
    _assert_clear_failure(result, f"{run} is not writable", "resume the copy")


def test_eval_without_a_checkpoint_says_what_to_give(run_main):
    result = run_main("mrl-eval")
    _assert_clear_failure(result, "mrl-eval needs the checkpoint to evaluate", "ckpt_path=")
    assert len(result.output.strip().splitlines()) == 1
    assert run_main("mrl-eval", "--help").returncode == 0


def _sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        write_job_dir(sweep / str(seed), {"kind": "mrl"}, seed, top1_results({4: 0.5, 8: 0.6}))
    return sweep


def test_report_out_that_is_a_file_or_read_only_is_refused_before_the_work(run_main, tmp_path):
    sweep = _sweep(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    result = run_main("mrl-report", str(sweep), "--out", str(blocker), "--no-wandb")
    _assert_clear_failure(result, f"--out {blocker} is a file", "Give --out a folder")
    assert blocker.read_text() == "mine"
    assert run_main("mrl-report", str(sweep), "--out", str(tmp_path / "new"), "--no-wandb").returncode == 0


@AS_ROOT
def test_report_into_a_read_only_sweep_is_refused_before_the_work(run_main, tmp_path):
    sweep = _sweep(tmp_path)
    sweep.chmod(0o555)
    result = run_main("mrl-report", str(sweep), "--no-wandb")
    _assert_clear_failure(result, f"Cannot write the report into {sweep / 'report'}", "Give --out")


def test_a_corrupt_overrides_record_is_named(run_main, tmp_path):
    sweep = _sweep(tmp_path)
    record = sweep / "1" / ".hydra" / "overrides.yaml"
    record.write_text("- seed=1\n- head: [mrl\n")
    result = run_main("mrl-report", str(sweep), "--no-wandb")
    _assert_clear_failure(result, f"Cannot read {record}", "not YAML", "remove that job's directory")
    assert not (sweep / "report").exists()
    record.write_text("seed: 1\n")  # YAML, but not Hydra's list of overrides
    _assert_clear_failure(
        run_main("mrl-report", str(sweep), "--no-wandb"), f"Cannot read {record} (not a list)"
    )


def test_dashboard_out_may_name_a_folder_but_not_an_unwritable_place(tmp_path, monkeypatch, capsys):
    """Offline, mrl-dashboard writes its spec to --out: a folder gets the default file name in it."""
    import json

    import mrl.cli.dashboard as cli
    from mrl.tracking.dashboards.keys import LoggedRun

    run = LoggedRun(project="p", job_type="train", history={"val/acc@4", "val/acc@8", "trainer/global_step"})
    monkeypatch.setattr(cli, "_runs", lambda args, reason: [run])
    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = tmp_path / "specs"
    folder.mkdir()
    cli.main(["--project", "p", "--out", str(folder)])
    assert json.loads((folder / "wandb_workspace_p.json").read_text())["kind"] == "workspace"
    assert str(folder / "wandb_workspace_p.json") in capsys.readouterr().out

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["--project", "p", "--out", str(blocker / "spec.json")])
    err = capsys.readouterr().err
    assert f"Cannot write the workspace spec {blocker / 'spec.json'}" in err and "Traceback" not in err
