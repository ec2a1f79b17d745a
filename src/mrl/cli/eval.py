"""``mrl-eval``: Hydra entry point of the evaluation job (``conf/eval.yaml``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mrl.cli.common import register_resolvers, report_user_errors
from mrl.config_path import config_dir


def eval_dir_name(ckpt_path: str) -> str:
    """``<training run dir>_<checkpoint stem>``: the same checkpoint always gets the same output dir, so
    a second evaluation reuses its exported embeddings."""
    ckpt = Path(str(ckpt_path))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = f"{run_dir.name}_{ckpt.stem}" if run_dir.name else ckpt.stem
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name) or "checkpoint"


@report_user_errors
def run(cfg: DictConfig) -> None:
    from mrl.eval.run import evaluate  # heavy imports after Hydra has parsed the command line
    from mrl.logs import quiet_third_party_logs
    from mrl.preflight import check_eval, resolve

    quiet_third_party_logs()
    resolved = resolve(cfg)
    check_eval(resolved)  # every setting that can be judged before the checkpoint is read
    Path(resolved.paths.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(resolved, Path(resolved.paths.output_dir) / "eval_config.yaml")
    evaluate(resolved)


def main() -> None:
    register_resolvers()
    if not OmegaConf.has_resolver("mrl_eval_name"):
        OmegaConf.register_new_resolver("mrl_eval_name", eval_dir_name)
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")(run)()


if __name__ == "__main__":
    sys.exit(main())
