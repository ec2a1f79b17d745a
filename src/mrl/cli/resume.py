"""``mrl-train resume=<run dir>``: continue a stopped run in its own directory and W&B run.

The resumed job reloads the run's ``resolved_config.yaml`` (so it trains the same model, data and
W&B run id), applies only plain ``key=value`` overrides from the command line (for example a larger
``trainer.max_epochs``) and starts from the run's newest checkpoint. A SLURM job requeued after a
preemption re-enters its own directory and resumes the same way without being asked.
"""

from __future__ import annotations

import os
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict

from mrl.cli.common import command_line_value, hydra_quote
from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.files import unwritable
from mrl.training.checkpoints import LoadedCheckpoint, last_checkpoint, renamed_targets, trained_epochs

RESOLVED_CONFIG_NAME = "resolved_config.yaml"
_ABSENT = object()  # a key the run's config does not have (None is a value it may have)


def resume_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv for Hydra, the run's overrides)``: Hydra's run dir pointed at the run being resumed (checked
    first, so a wrong path creates nothing), and the command line's ``key=value`` overrides taken out.

    Hydra would apply those to a config composed from the defaults, which need not have the run's keys
    (``data.input_dir`` of a shards run is no key of the default data set); :func:`resume_config`
    applies them to the run's own config instead. Not resuming: ``(argv, [])``.
    """
    given = command_line_value(argv, "resume")
    if not given:
        return argv, []
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise MRLError(
            "resume=<run dir> continues one run; drop -m/--multirun and resume each job on its own."
        )
    run_dir = Path(given).expanduser().resolve()
    if not (run_dir / RESOLVED_CONFIG_NAME).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {RESOLVED_CONFIG_NAME}"
        raise MRLError(
            f"resume={shlex.quote(given)}: {run_dir} {what}, so it is not an mrl-train run directory. "
            "Give the directory of the run to continue (logs/train/runs/<date>_<time>_<id>, or a multirun "
            "job's numbered subdirectory)."
        )
    reason = unwritable(run_dir)
    if reason:
        raise MRLError(
            f"resume={shlex.quote(given)}: {reason}, and a resumed run writes into its own directory. "
            "Copy the run directory to a writable place and resume the copy (resume=<copy>)."
        )
    kept, overrides = argv[:1], []
    for arg in argv[1:]:
        key = arg.split("=", 1)[0].lstrip("+~")
        is_override = not arg.startswith("-") and ("=" in arg or arg.startswith("~"))
        if is_override and key != "resume" and not key.startswith(("hydra.", "hydra/")):
            overrides.append(arg)
        else:
            kept.append(arg)
    try:
        OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise MRLError(f"resume=: cannot read the overrides {' '.join(overrides)} ({err}).") from None
    # The resumed job writes into the run's own directory; Hydra's record of it goes beside the original.
    return [
        *kept,
        f"hydra.run.dir={hydra_quote(str(run_dir))}",
        "hydra.output_subdir=.hydra/resume",
    ], overrides


def resume_config(
    run_dir: Path, overrides: list[str], chosen: LoadedCheckpoint | None = None
) -> tuple[DictConfig, LoadedCheckpoint | None]:
    """The stopped run's config with the command line's ``key=value`` overrides, starting from its
    newest checkpoint (``ckpt_path`` unless one was given), and that checkpoint as read when picking it
    (``chosen``, when the caller has picked it already), for :func:`mrl.training.job.train`.

    Each override is judged against the run's own config, as Hydra judges one against a composed config:
    ``key=value`` must name a key the run has (``+key=value`` adds one); a config group (``head=mrl_e``)
    or a deletion would make it another run."""
    stored = OmegaConf.to_container(OmegaConf.load(run_dir / RESOLVED_CONFIG_NAME))
    cfg = relocate(OmegaConf.create(renamed_targets(stored)), run_dir)
    groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir()}
    explicit_ckpt = False
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "resume":
            continue
        value = override.value()
        current = OmegaConf.select(cfg, key, default=_ABSENT)
        if (
            override.is_delete()
            or override.package
            or key in groups
            or (OmegaConf.is_dict(current) and not isinstance(value, dict))
        ):
            raise MRLError(
                f"resume= keeps the run's config; '{override.input_line}' changes a whole config group. "
                "Only key=value overrides such as trainer.max_epochs=10 are allowed when resuming: start "
                "a new run to change the model, data or trainer."
            )
        if current is _ABSENT and not (override.is_add() or override.is_force_add()):
            raise MRLError(
                f"resume=: the run's config ({run_dir / RESOLVED_CONFIG_NAME}) has no {key}, so "
                f"'{override.input_line}' would set nothing it uses. Check the spelling against that file, "
                f"or write +{key}=... to add a setting the run did not have."
            )
        explicit_ckpt = explicit_ckpt or key == "ckpt_path"
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    if overrides:
        _rename_wandb_run(cfg, overrides)
    if explicit_ckpt:
        chosen = None
    elif chosen is None:
        chosen = last_checkpoint(run_dir)
    if chosen is not None and chosen.contents is not None:
        _check_epochs(cfg, chosen)
    with open_dict(cfg):
        cfg.resume = str(run_dir)
        if chosen is not None:
            cfg.ckpt_path = str(chosen.path)
    return cfg, chosen


# the items of a W&B run name made of overrides (Hydra's override_dirname): a comma starts an item only
# where a key follows (head.nesting=[4,8] is one item)
_NAME_ITEM = re.compile(r",(?=[+~]*[A-Za-z_][\w.@/-]*=)")
_JOB_NUM = re.compile(r"^(\d+:)?(.*)$", re.S)


def _rename_wandb_run(cfg: DictConfig, overrides: list[str]) -> None:
    """A W&B run named after the job's overrides (the default, ``logger.wandb.name: null``; a sweep job's
    with its number first) is renamed with the command line's overrides in place of its items of the same
    keys, so ``resume=<run> data.input_dir=<other data>`` does not show the old data. A name the user
    chose (not a list of ``key=value``) is kept."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    name = wandb_cfg.get("name") if wandb_cfg is not None else None
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not isinstance(name, str) or any(o.key_or_group == "logger.wandb.name" for o in parsed):
        return
    prefix, body = _JOB_NUM.match(name).groups()
    items = [] if body == "default" else _NAME_ITEM.split(body)
    if not all("=" in item for item in items):
        return
    given = {o.key_or_group: o.input_line for o in parsed if o.key_or_group != "ckpt_path"}
    kept = [i for i in items if i.split("=", 1)[0].lstrip("+~") not in given]
    with open_dict(wandb_cfg):
        wandb_cfg.name = (prefix or "") + (",".join(sorted([*kept, *given.values()])) or "default")


def _check_epochs(cfg: DictConfig, chosen: LoadedCheckpoint) -> None:
    """Refuse a ``trainer.max_epochs`` below the epochs the checkpoint has trained (Lightning stops with
    a traceback there)."""
    limit = (cfg.get("trainer") or {}).get("max_epochs")
    done = trained_epochs(chosen.contents)
    if isinstance(limit, int) and limit != -1 and done > limit:
        raise MRLError(
            f"resume= with trainer.max_epochs={limit}, but {chosen.path} has trained {done} epochs "
            f"already, and a run cannot go back. Give trainer.max_epochs={done + 1} or more to train "
            "longer, or no trainer.max_epochs to go on as the run was set up."
        )


def relocate(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config with every path inside the run's recorded output dir moved to ``run_dir``.

    A run directory that was copied or moved keeps its old absolute paths in resolved_config.yaml
    (output dir, checkpoint dir, logger dirs); resuming it must write where it is now, never into the
    place it came from (which may hold the original run, still in use).
    """
    old = str((cfg.get("paths") or {}).get("output_dir") or "")
    new = str(run_dir)
    if not old or old == new:
        return cfg

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            return new + value[len(old) :]
        return value

    return OmegaConf.create(move(OmegaConf.to_container(cfg, resolve=False)))


def requeued_run(output_dir: Path) -> LoadedCheckpoint | None:
    """For a SLURM job requeued after a preemption (``SLURM_RESTART_COUNT`` > 0) whose directory already
    holds its config and a checkpoint, the checkpoint it must continue from (read); None otherwise."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) <= 0:
        return None
    if not (output_dir / RESOLVED_CONFIG_NAME).is_file():
        return None
    try:
        return last_checkpoint(output_dir)
    except MRLError:
        return None


def ensure_wandb_id(cfg: DictConfig) -> None:
    """Give the W&B logger a run id now, stored in resolved_config.yaml, so resuming reuses it."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None and wandb_cfg.get("id") is None:
        with open_dict(wandb_cfg):
            wandb_cfg.id = uuid.uuid4().hex[:12]
            wandb_cfg.resume = wandb_cfg.get("resume") or "allow"
