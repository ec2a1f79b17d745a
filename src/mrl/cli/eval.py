"""``mrl-eval``: Hydra entry point of the evaluation job (``conf/eval.yaml``)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mrl.cli.common import INFO_FLAGS, check_output_location, fail, named_job_dir, report_user_errors
from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.eval.locations import check_output_dir, checkpoint_id, standalone_dir_name
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
    holding another checkpoint's evaluation, before Hydra creates (or writes its config into) the output
    dir."""
    if any(a in INFO_FLAGS for a in argv[1:]):
        return
    args = dict(a.lstrip("+").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    ckpt = args.get("ckpt_path")
    if not ckpt:
        # Hydra would stop with a traceback about the output dir's name, which interpolates ckpt_path
        fail(
            "mrl-eval needs the checkpoint to evaluate: mrl-eval ckpt_path=<run dir>/checkpoints/last.ckpt "
            "(a checkpoint written by mrl-train, or a checkpoint of the paper's repository with a data "
            "config: docs/evaluation.md). mrl-eval --help lists the other settings.",
            hint=None,
        )
    check_output_location(argv, "no evaluation started")
    if "${" in ckpt:
        return
    from mrl.training.checkpoints import require_checkpoint_file  # imports torch: only when there is a path

    try:
        require_checkpoint_file(ckpt)
        run_dir = args.get("hydra.run.dir")
        if run_dir and "${" not in run_dir:
            check_output_dir(Path(run_dir.strip("'\"")), ckpt, checkpoint_id(ckpt))
    except MRLError as err:
        fail(str(err))


def main() -> None:
    check_before_hydra(sys.argv)
    register_resolvers()
    if not OmegaConf.has_resolver("mrl_eval_name"):
        OmegaConf.register_new_resolver("mrl_eval_name", eval_dir_name)
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
