"""``mrl-train``: Hydra entry point of the training job (``conf/train.yaml``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mrl.cli.common import fail, report_user_errors
from mrl.cli.resume import RESOLVED_CONFIG_NAME, ensure_wandb_id, requeued_run, resume_argv, resume_config
from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.resolvers import register_resolvers

# Lightning's DDP launcher starts the worker processes by re-running this script with the same
# command line. Under Hydra that would compose the config again, create a second output dir and, in a
# multirun, start the whole sweep again inside every worker (the well-known Hydra + DDP hang). Instead
# the launching process writes its resolved config to the job dir and names it in this variable, which
# the workers inherit: a worker then skips Hydra and trains from that file in the same output dir.
DDP_CONFIG_ENV = "MRL_DDP_CONFIG"


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
    from mrl.logs import quiet_third_party_logs
    from mrl.preflight import check_run_config_file, check_train, resolve
    from mrl.training.job import train  # heavy imports after Hydra has parsed the command line

    quiet_third_party_logs()
    out = Path(HydraConfig.get().runtime.output_dir)
    requeued = None if cfg.get("resume") else requeued_run(out)
    chosen = None  # the checkpoint a resumed run continues from, read once (passed on to train)
    if cfg.get("resume") or requeued is not None:
        # Same config, checkpoint and W&B run id as the stopped run (see mrl/cli/resume.py).
        check_run_config_file(out / RESOLVED_CONFIG_NAME)
        resolved, chosen = resume_config(out, list(HydraConfig.get().overrides.task), requeued)
        print(f"Resuming {out} from {resolved.ckpt_path}", file=sys.stderr, flush=True)
    else:
        _fill_run_names(cfg)
        ensure_wandb_id(cfg)
        resolved = resolve(cfg)
    check_train(resolved)  # every setting that can be judged now, before anything is written
    out = Path(resolved.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / RESOLVED_CONFIG_NAME
    OmegaConf.save(resolved, config_file)
    os.environ[DDP_CONFIG_ENV] = str(config_file)
    try:
        result = train(resolved, chosen)
    finally:
        os.environ.pop(DDP_CONFIG_ENV, None)
    if resolved.get("evaluate") is not None and result.is_global_zero:
        from mrl.eval.after_training import evaluate_after_training

        evaluate_after_training(resolved.evaluate, result.checkpoint, out, resolved)
    return optimized_value(result.metrics, cfg.get("optimized_metric"))


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


def check_output_location(argv: list[str]) -> None:
    """Fail before Hydra creates anything when the output location cannot be written.

    Hydra makes the job directory itself, before any of our code runs, and reports a failure there
    with a traceback; so the directory named on the command line (or ``MRL_LOG_DIR``, default
    ``logs``) is checked here: its nearest existing ancestor must be a writable directory.
    """
    target = os.environ.get("MRL_LOG_DIR") or "logs"
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir") and value and "${" not in value:
            target = value
    path = Path(target).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(
            f"Cannot create the output directory {path}: {existing} is not a writable directory. Choose a "
            "writable place with paths.log_dir=<dir>, hydra.run.dir=<dir> or MRL_LOG_DIR=<dir>; nothing was "
            "written and no training started."
        )


def main() -> None:
    if _is_ddp_worker():
        run_ddp_worker()
        return
    register_resolvers()
    check_output_location(sys.argv)
    try:
        sys.argv = resume_argv(sys.argv)
    except MRLError as err:
        fail(str(err))
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(run)()


if __name__ == "__main__":
    sys.exit(main())
