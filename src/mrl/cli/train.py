"""``mrl-train``: Hydra entry point of the training job (``conf/train.yaml``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mrl.cli.common import (
    check_output_location,
    fail,
    hydra_argv,
    is_multirun,
    named_job_dir,
    report_user_errors,
)
from mrl.cli.resume import RESOLVED_CONFIG_NAME, ensure_wandb_id, requeued_run, resume_argv, resume_config
from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.files import atomic_write_text, directory_lock
from mrl.resolvers import register_resolvers
from mrl.training.checkpoints import CHECKPOINT_DIR

# Lightning's DDP launcher starts the worker processes by re-running this script with the same
# command line. Under Hydra that would compose the config again, create a second output dir and, in a
# multirun, start the whole sweep again inside every worker (the well-known Hydra + DDP hang). Instead
# the launching process writes its resolved config to the job dir and names it in this variable, which
# the workers inherit: a worker then skips Hydra and trains from that file in the same output dir.
DDP_CONFIG_ENV = "MRL_DDP_CONFIG"
# resume=: the command line's key=value overrides, taken out of Hydra's (mrl.cli.resume.resume_argv).
RESUME_OVERRIDES_ENV = "MRL_RESUME_OVERRIDES"


def _is_ddp_worker() -> bool:
    return bool(os.environ.get(DDP_CONFIG_ENV)) and os.environ.get("LOCAL_RANK", "0") != "0"


def _fill_run_names(cfg: DictConfig) -> None:
    """W&B group = the sweep (or single run) dir name, run name = the job's overrides."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    out = Path(hydra_cfg.runtime.output_dir)
    group = Path(hydra_cfg.sweep.dir).name if multirun else out.name
    name = hydra_cfg.job.override_dirname or "default"
    if multirun:
        name = f"{hydra_cfg.job.num}:{name}"
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None:
        with open_dict(wandb_cfg):
            if wandb_cfg.get("group") is None:
                wandb_cfg.group = group
            if wandb_cfg.get("name") is None:
                wandb_cfg.name = name


@report_user_errors
def run(cfg: DictConfig) -> float | None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with holding(out):  # one job per directory, for the job's whole life (evaluate= included)
        return _train_job(cfg, out)


def _train_job(cfg: DictConfig, out: Path) -> float | None:
    from mrl.logs import quiet_third_party_logs
    from mrl.preflight import check_run_config_file, check_train, resolve
    from mrl.training.job import train  # heavy imports after Hydra has parsed the command line

    quiet_third_party_logs()
    requeued = None if cfg.get("resume") else requeued_run(out)
    chosen = None  # the checkpoint a resumed run continues from, read once (passed on to train)
    if cfg.get("resume") or requeued is not None:
        # Same config, checkpoint and W&B run id as the stopped run (see mrl/cli/resume.py). A requeued
        # job's command line is the one its stored config was composed from: nothing to apply again.
        check_run_config_file(out / RESOLVED_CONFIG_NAME)
        overrides = json.loads(os.environ.get(RESUME_OVERRIDES_ENV) or "[]") if cfg.get("resume") else []
        resolved, chosen = resume_config(out, overrides, requeued)
        print(f"Resuming {out} from {resolved.ckpt_path}", file=sys.stderr, flush=True)
    else:
        _fill_run_names(cfg)
        ensure_wandb_id(cfg)
        resolved = resolve(cfg)
    check_train(resolved)  # every setting that can be judged now, before anything is written
    out = Path(resolved.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / RESOLVED_CONFIG_NAME
    keep_old = chosen is not None or bool(cfg.get("resume"))
    # Under torchrun or srun every process composed the same config; the first one writes it (the others'
    # W&B run id, drawn on their own, is not the run's)
    writing = _run_config(config_file, resolved, keep_old) if first_process() else contextlib.nullcontext()
    with writing:
        result = train(resolved, chosen)
    if resolved.get("evaluate") is not None and result.is_global_zero:
        from mrl.eval.after_training import evaluate_after_training

        evaluate_after_training(resolved.evaluate, result.checkpoint, out, resolved)
    return optimized_value(result.metrics, cfg.get("optimized_metric"))


@contextlib.contextmanager
def _run_config(config_file: Path, resolved: DictConfig, keep_old: bool) -> Iterator[None]:
    """Write the job's resolved config (resuming reads it, DDP workers train from it) for the block.

    ``keep_old`` (a resumed run): an attempt that fails before it wrote a checkpoint (other classes,
    another model, a bad setting found once the model is built) puts the run's previous config back, so
    that it still describes the run's checkpoints and a plain ``resume=`` goes on as before.
    """
    previous = config_file.read_text() if keep_old and config_file.is_file() else None
    started = time.time_ns()
    atomic_write_text(config_file, OmegaConf.to_yaml(resolved))
    os.environ[DDP_CONFIG_ENV] = str(config_file)
    try:
        yield
    except BaseException:
        checkpoints = (config_file.parent / CHECKPOINT_DIR).glob("*.ckpt")
        if previous is not None and not any(p.stat().st_mtime_ns >= started for p in checkpoints):
            atomic_write_text(config_file, previous)
        raise
    finally:
        os.environ.pop(DDP_CONFIG_ENV, None)


# Under torchrun, SLURM (one task per GPU) or a multi-node launch every process of a DDP job runs this
# command; only the first (global rank 0) holds the job's directory. Lightning's own DDP workers never get
# here (see DDP_CONFIG_ENV).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def first_process() -> bool:
    """Whether this is the job's first process (global rank 0), however it was launched."""
    return all((os.environ.get(v) or "0").strip() == "0" for v in RANK_VARIABLES)


def holding(directory: Path | None) -> contextlib.AbstractContextManager:
    """Hold ``directory`` for this job (:func:`mrl.files.directory_lock`), in the process that owns it."""
    if directory is None or not first_process():
        return contextlib.nullcontext()
    return directory_lock(directory, "mrl-train")


def optimized_value(results: dict[str, float], metric: str | None) -> float | None:
    """The value a sweeper (Optuna) optimises; ``<stage>/acc@full`` names the largest trained size.

    The name was checked before training (:func:`mrl.training.checks.check_optimized_metric`); the error
    below remains for metrics a run did not reach (for example no validation epoch ran)."""
    if not metric:
        return None
    if metric.endswith("@full"):
        prefix = metric[: -len("full")]
        sizes = [
            int(k[len(prefix) :]) for k in results if k.startswith(prefix) and k[len(prefix) :].isdigit()
        ]
        metric = f"{prefix}{max(sizes)}" if sizes else metric
    if metric not in results:
        raise MRLError(
            f"optimized_metric={metric} was not logged by this job; choose one of: "
            f"{', '.join(sorted(results))}."
        )
    return results[metric]


@report_user_errors
def run_ddp_worker() -> None:
    from mrl.logs import quiet_third_party_logs
    from mrl.training.job import train

    quiet_third_party_logs()

    train(OmegaConf.load(os.environ[DDP_CONFIG_ENV]))


def check_sweep(argv: list[str]) -> None:
    """Before a sweep of Hydra's basic sweeper starts, every job's ``evaluate=`` settings, judged against
    that job's data (:func:`mrl.preflight.check_evaluate`: a neighbour count above what its database
    split has, ...); each job judges them again before it trains. A job of a sweep that stopped there
    would have trained for nothing, and the sweep would stop after the jobs before it."""
    if not is_multirun(argv) or any("sweeper" in a or "hparams_search" in a for a in argv[1:]):
        return
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mrl.preflight import check_evaluate, resolve

    given = [a for a in argv[1:] if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)[0]
        with initialize_config_dir(config_dir(), version_base="1.3"):
            configs = [compose("train", overrides=["paths.output_dir=job", *job]) for job in jobs]
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # Hydra reports what it cannot compose
    for num, (job, cfg) in enumerate(zip(jobs, configs, strict=True)):
        try:
            if cfg.get("evaluate") is not None:
                check_evaluate(resolve(cfg))
        except MRLError as err:
            raise MRLError(f"Job {num} of the sweep ({','.join(job)}): {err} No job was started.") from None


def main() -> None:
    if _is_ddp_worker():
        run_ddp_worker()
        return
    register_resolvers()
    sys.argv = hydra_argv(sys.argv)  # paths with characters Hydra's grammar takes only quoted
    try:
        sys.argv, overrides = resume_argv(sys.argv)
    except MRLError as err:
        fail(str(err))
    os.environ.pop(RESUME_OVERRIDES_ENV, None)
    if overrides:
        os.environ[RESUME_OVERRIDES_ENV] = json.dumps(overrides)  # applied to the run's config (run)
    check_output_location(sys.argv, "no training started")
    try:
        check_sweep(sys.argv)
    except MRLError as err:
        fail(str(err))
    with contextlib.ExitStack() as stack:
        # A directory named on the command line (hydra.run.dir=, hydra.sweep.dir=, resume=) is held before
        # Hydra writes its record (.hydra/) and log file into it; each job holds its own again in run.
        try:
            stack.enter_context(holding(named_job_dir(sys.argv)))
        except MRLError as err:
            fail(str(err))
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(run)()


if __name__ == "__main__":
    sys.exit(main())
