"""One job per directory: a second mrl-train of one hydra.run.dir, a second resume= of one run or a second
mrl-eval into one evaluation directory is refused while the first runs, and writes nothing there; a job
that was killed holds nothing."""

from __future__ import annotations

import pytest

from support import TINY, directory_held, kill_run, start, wait_until_stopped

REFUSED = "is in use by another job"


def _fingerprint(directory):
    """Every file under ``directory`` (Hydra's record and the log included) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _assert_refused(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in (REFUSED, *expected):
        assert text in result.output, result.output[-3000:]


@pytest.mark.slow
def test_a_second_job_in_a_running_jobs_directory_is_refused(run_main, tmp_path):
    job = tmp_path / "job"
    # The first job stops itself (SIGSTOP) at step 2 of 4, its checkpoints of steps 1 and 2 written.
    first = start(
        tmp_path, *TINY, "logger=none", "checkpoint_every_n_steps=1", f"hydra.run.dir={job}", stop_at="2"
    )
    try:
        wait_until_stopped(first)
        before = _fingerprint(job)
        holder = f"mrl-train, process {first.proc.pid} on "
        _assert_refused(run_main("mrl-train", *TINY, "logger=none", f"hydra.run.dir={job}"), holder)
        _assert_refused(run_main("mrl-train", f"resume={job}", "trainer.max_epochs=2"), holder)
        assert _fingerprint(job) == before  # not even Hydra's record (.hydra/) or the log changed
    finally:
        kill_run(first)  # SIGKILL, as a crash: its lock ends with it
    resumed = run_main("mrl-train", f"resume={job}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert (job / "results.json").is_file()
    assert not (job / ".mrl.lock").exists()

    # mrl-eval: an evaluation directory another process holds
    place = tmp_path / "evaluation"
    with directory_held(place):
        result = run_main(
            "mrl-eval", f"ckpt_path={job}/checkpoints/last.ckpt", "logger=none", f"hydra.run.dir={place}"
        )
        _assert_refused(result, "a test's holder")
        assert sorted(p.name for p in place.iterdir()) == [".mrl.lock"]


def test_only_the_first_process_of_a_ddp_job_holds_its_directory(tmp_path, monkeypatch):
    """Under torchrun, SLURM or a multi-node launch every process of a job runs mrl-train: only global
    rank 0 takes the directory (the others would be refused by it)."""
    from mrl.cli.train import holding
    from mrl.errors import MRLError

    with directory_held(tmp_path / "job"):
        for variable in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
            monkeypatch.setenv(variable, "1")
            with holding(tmp_path / "job"):  # not taken: nothing refused
                pass
            monkeypatch.setenv(variable, "0")
        with pytest.raises(MRLError, match=REFUSED), holding(tmp_path / "job"):
            pass
