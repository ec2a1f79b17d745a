"""``mrl-eval``: Hydra entry point of the evaluation job (``conf/eval.yaml``)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mrl.cli.common import (
    INFO_FLAGS,
    check_output_location,
    command_line_value,
    fail,
    hydra_argv,
    named_job_dir,
    report_user_errors,
)
from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.eval.locations import (
    CHECKPOINT_RECORD,
    check_output_dir,
    checkpoint_id,
    evaluation_settings,
    standalone_dir_name,
)
from mrl.files import directory_lock
from mrl.resolvers import register_resolvers


def eval_dir_name(ckpt_path: str) -> str:
    """``<training run dir>_<checkpoint stem>-<content id>``: one output dir per checkpoint, the same one
    whenever that checkpoint is evaluated again (so its exported embeddings are reused)."""
    if not Path(str(ckpt_path)).is_file():
        return Path(str(ckpt_path)).stem or "checkpoint"  # refused before any work, in evaluate()
    return standalone_dir_name(ckpt_path, checkpoint_id(ckpt_path))


@report_user_errors
def run(cfg: DictConfig) -> None:
    from mrl.eval.run import evaluate  # heavy imports after Hydra has parsed the command line
    from mrl.logs import quiet_third_party_logs
    from mrl.preflight import check_eval, resolve

    quiet_third_party_logs()
    resolved = resolve(cfg)
    check_eval(resolved)  # every setting that can be judged before the checkpoint is read
    # one evaluation per directory at a time: a second of the same checkpoint waits for none, it is refused
    with directory_lock(HydraConfig.get().runtime.output_dir, "mrl-eval"):
        evaluate(resolved)


def check_before_hydra(argv: list[str]) -> None:
    """Refuse a missing checkpoint, an output place that cannot be written, or an explicit output dir
    holding another checkpoint's evaluation (or this checkpoint's with other settings), before Hydra
    creates (or writes its config into) the output dir."""
    if any(a in INFO_FLAGS for a in argv[1:]):
        return
    ckpt = command_line_value(argv, "ckpt_path")
    if not ckpt:
        # Hydra would stop with a traceback about the output dir's name, which interpolates ckpt_path
        fail(
            "mrl-eval needs the checkpoint to evaluate: mrl-eval ckpt_path=<run dir>/checkpoints/last.ckpt "
            "(a checkpoint written by mrl-train, or a checkpoint of the paper's repository with a data "
            "config: docs/evaluation.md). mrl-eval --help lists the other settings.",
            hint=None,
        )
    check_output_location(argv, "no evaluation started")
    from mrl.training.checkpoints import require_checkpoint_file  # imports torch: only when there is a path

    try:
        require_checkpoint_file(ckpt)
        run_dir = named_job_dir(argv)
        if run_dir is not None and (run_dir / CHECKPOINT_RECORD).is_file():
            check_output_dir(run_dir, ckpt, checkpoint_id(ckpt), _settings(argv))
    except MRLError as err:
        fail(str(err))


def _settings(argv: list[str]) -> dict | None:
    """What the command line evaluates (:func:`~mrl.eval.locations.evaluation_settings` of conf/eval.yaml
    composed with its overrides), or None when Hydra cannot compose it (Hydra then says why)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    overrides = [a for a in argv[1:] if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("eval", overrides=overrides)
        return evaluation_settings(cfg)
    except (HydraException, OmegaConfBaseException, ValueError):
        return None


def group_options(group: str) -> str:
    """``csv, none, wandb (default)``: the choices of a config group (conf/<group>/*.yaml) and
    conf/eval.yaml's default among them, for --help."""
    defaults = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "eval.yaml")).get("defaults") or []
    default = next((d[group] for d in defaults if isinstance(d, dict) and group in d), None)
    names = sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
    return ", ".join(f"{n} (default)" if n == default else n for n in names)


def main() -> None:
    sys.argv = hydra_argv(sys.argv)  # paths with characters Hydra's grammar takes only quoted
    register_resolvers()
    if not OmegaConf.has_resolver("mrl_eval_name"):
        OmegaConf.register_new_resolver("mrl_eval_name", eval_dir_name)
    if not OmegaConf.has_resolver("mrl_group_options"):
        OmegaConf.register_new_resolver("mrl_group_options", group_options)
    check_before_hydra(sys.argv)
    with contextlib.ExitStack() as stack:
        named = named_job_dir(sys.argv)  # held before Hydra writes its record there; else held in run
        if named is not None:
            try:
                stack.enter_context(directory_lock(named, "mrl-eval"))
            except MRLError as err:
                fail(str(err))
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")(run)()


if __name__ == "__main__":
    sys.exit(main())
