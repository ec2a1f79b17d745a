"""Paths with spaces and characters outside ASCII, given as a shell user writes them: training, evaluation,
resume= and mrl-report all read the same path (Hydra's grammar takes no such character unquoted, and the
pre-checks used to keep the quotes). Also what mrl-eval and resume= read off the command line before Hydra
starts: an evaluation directory of other settings, and the W&B run name after resume= with other data."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from support import TINY

ODD = "mes runs é (1)"


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("ckpt_path=/d/mes runs é/last.ckpt", "/d/mes runs é/last.ckpt"),  # the shell took the quotes
        ('ckpt_path="/d/mes runs é/last.ckpt"', "/d/mes runs é/last.ckpt"),  # Hydra's own quoting
        ("ckpt_path='/d/it\\'s é/last.ckpt'", "/d/it's é/last.ckpt"),
        ("+ckpt_path=/d/a#b&c(1)/x.ckpt", "/d/a#b&c(1)/x.ckpt"),
        ("ckpt_path=/d/plain/x.ckpt", "/d/plain/x.ckpt"),
    ],
)
def test_the_pre_checks_read_a_path_as_hydra_does(given, read):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mrl.cli.common import command_line_value, hydra_argv

    argv = hydra_argv(["mrl-eval", given])
    assert command_line_value(argv, "ckpt_path") == read
    assert OverridesParser.create().parse_override(argv[1]).value() == read


def test_hydra_syntax_is_left_to_hydra_and_sweeps_keep_their_commas():
    from mrl.cli.common import hydra_argv

    argv = ["mrl-train", "head.nesting=[4,8", "data.root=/é/a,/é/b", "seed=0,1", "-m"]
    fixed = hydra_argv(argv)
    assert fixed[1] == "head.nesting=[4,8" and fixed[3:] == ["seed=0,1", "-m"]
    assert fixed[2] == "data.root='/é/a','/é/b'"


def test_train_eval_resume_and_report_under_a_path_with_spaces_and_accents(run_main, tmp_path):
    logs = tmp_path / ODD
    env = {"MRL_LOG_DIR": str(logs)}
    trained = run_main("mrl-train", *TINY, "logger=none", env=env)
    assert trained.returncode == 0, trained.output[-3000:]
    (run,) = (logs / "train" / "runs").iterdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    cheap = ("logger=none", "sizes=[8,256]", "methods.adaptive_retrieval=false", "methods.baselines=false")
    places = set()
    for given in (f"ckpt_path={ckpt}", f'ckpt_path="{ckpt}"'):  # as the shell passes each on
        evaluated = run_main("mrl-eval", given, *cheap, env=env)
        assert evaluated.returncode == 0, evaluated.output[-3000:]
        places |= {p.parent for p in (logs / "eval" / "runs").glob("*/report.json")}
    assert len(places) == 1  # both name the same checkpoint, so the same evaluation
    resumed = run_main("mrl-train", f"resume={run}", "trainer.max_epochs=2", env=env)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "Resuming" in resumed.output and (run / "checkpoints" / "epoch001.ckpt").is_file()
    reported = run_main("mrl-report", str(logs / "train" / "runs"), "--no-wandb", env=env)
    assert reported.returncode == 0, reported.output[-3000:]
    assert (logs / "train" / "runs" / "report" / "comparison.json").is_file()


def test_a_missing_run_with_an_odd_path_is_named_quoted(run_main, tmp_path):
    missing = tmp_path / ODD / "run"
    result = run_main("mrl-train", f"resume={missing}")
    assert result.returncode == 1 and f"resume={shlex.quote(str(missing))}: {missing}" in result.output


def test_an_evaluation_dir_of_other_settings_is_refused_before_hydra_writes_there(run_main, tmp_path):
    from mrl.eval.after_training import compose_eval_config
    from mrl.eval.locations import CHECKPOINT_RECORD, checkpoint_id, checkpoint_record, evaluation_settings

    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 not read before the refusal")
    out = tmp_path / "evaluated"
    out.mkdir()
    record = checkpoint_record(ckpt, checkpoint_id(ckpt), evaluation_settings(compose_eval_config()))
    (out / CHECKPOINT_RECORD).write_text(json.dumps(record))
    result = run_main("mrl-eval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "query_split=val")
    assert result.returncode == 1, result.output[-3000:]
    assert "with other settings" in result.output and 'query_split="val" (there: "test")' in result.output
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_RECORD]  # no .hydra/, no log


def test_resume_with_other_data_renames_the_wandb_run(tmp_path):
    from mrl.cli.resume import resume_config

    run = tmp_path / "run"
    run.mkdir()
    config = {
        "paths": {"output_dir": str(run)},
        "ckpt_path": None,
        "data": {"input_dir": "/old"},
        "logger": {"wandb": {"name": "3:data.input_dir=/old,head.nesting=[4,8],seed=1", "id": "abc"}},
    }
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    overrides = ["data.input_dir='/new é'", f"ckpt_path={run}/x.ckpt"]  # as hydra_argv quotes them
    cfg, _ = resume_config(run, overrides)
    assert cfg.data.input_dir == "/new é"
    assert cfg.logger.wandb.name == "3:data.input_dir='/new é',head.nesting=[4,8],seed=1"
    config["logger"]["wandb"]["name"] = "my run"  # a name the user chose is kept
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    assert resume_config(run, overrides)[0].logger.wandb.name == "my run"
