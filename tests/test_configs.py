"""Every config group option and every experiment recipe composes."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrl.config_path import config_dir
from mrl.resolvers import register_resolvers

CONF = Path(config_dir())
GROUPS = ["data", "backbone", "head", "objective", "optim", "sched", "trainer", "logger", "callbacks"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_group_option_composes(group, option):
    extra = {
        "imagefolder": ["data.root=/data/imagenet"],
        "imagenet_folder": ["data.root=/data/imagenet"],
        "shards": ["data.input_dir=/data/shards"],
        "imagenet": ["data.input_dir=/data/shards"],
    }.get(option, [])
    cfg = _compose(f"{group}={option}", "paths.output_dir=/tmp/job", *extra)
    # Every interpolation of the group resolves (a typo in one only shows at run time otherwise).
    resolved = OmegaConf.to_container(cfg[group], resolve=True)
    assert isinstance(resolved, dict)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = _compose(f"experiment={name}")
    assert cfg.trainer.max_epochs >= 1


def test_defaults_are_the_embedded_default_job():
    cfg = _compose()
    assert cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.head.kind == "mrl"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.logger.wandb.offline is True
    assert cfg.hydra.run.dir != cfg.hydra.sweep.dir


def test_packaged_config_dir_is_found():
    assert (CONF / "train.yaml").is_file()
    assert EXPERIMENTS, "experiments/ must hold at least one recipe"


@pytest.mark.parametrize("override", ["hydra/launcher=slurm", "hparams_search=optuna"])
def test_launcher_and_sweeper_compose(override):
    cfg = _compose(override, "trainer=ddp", "trainer.devices=4")
    if "slurm" in override:
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.gpus_per_node == 4
    else:
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.optimized_metric == "val/acc@full"


def test_optimized_value_full_alias():
    from mrl.cli.train import optimized_value

    results = {"val/acc@8": 0.5, "val/acc@64": 0.9, "val/loss": 1.0}
    assert optimized_value(results, "val/acc@full") == 0.9
    assert optimized_value(results, "val/acc@8") == 0.5
    assert optimized_value(results, None) is None


def test_wandb_writes_its_run_file_often_enough_for_a_killed_run(tmp_path):
    """The logger's W&B settings reach wandb as settings it accepts, with its run file written far more
    often than W&B's default: a run killed without warning keeps its history up to a fraction of a
    second before the kill. (The W&B test in test_reliability.py waits for that history rather than
    timing it, so this is where the interval is checked.)"""
    import wandb

    from mrl.tracking.wandb_setup import build_loggers

    (logger,) = build_loggers(_compose(f"paths.output_dir={tmp_path}"))
    interval = wandb.Settings(**logger._wandb_init["settings"]).x_transaction_log_flush_interval
    assert interval <= 1.0 < wandb.Settings().x_transaction_log_flush_interval


MODEL_GROUPS = [
    pytest.param(g, o, marks=pytest.mark.slow) if (g, o) == ("backbone", "resnet50") else (g, o)
    for g, o in OPTIONS
    if g in ("backbone", "head", "optim", "sched")
]


@pytest.mark.parametrize(("group", "option"), MODEL_GROUPS)
def test_model_group_option_builds_a_working_part(group, option):
    """Each backbone, head, optimizer and schedule option builds what it names (composition alone would
    not catch a wrong class path or argument) and takes a training step together."""
    import torch

    from mrl.instantiate import instantiate
    from mrl.models.build import build_parts, spec_from_config

    overrides = [f"{group}={option}", "paths.output_dir=/tmp/job"]
    if group != "backbone":  # the small default backbone keeps the other groups' checks quick
        overrides.append("backbone.name=test_byobnet")
    cfg = _compose(*overrides)
    backbone, head, loss = build_parts(cfg, spec_from_config(cfg, num_classes=3, in_chans=1, img_size=32))[:3]
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    optimizer = instantiate(cfg.optim)(model)
    if cfg.sched.get("_target_"):
        scheduler, _ = instantiate(cfg.sched)(
            optimizer, num_epochs=2, updates_per_epoch=3, step_on_epochs=False
        )
        scheduler.step_update(num_updates=1)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    loss(head(backbone(x)), y).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, o in OPTIONS if g in ("logger", "callbacks")])
def test_logger_and_callback_options_instantiate(group, option, tmp_path):
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from mrl.instantiate import instantiate

    cfg = _compose(f"{group}={option}", f"paths.output_dir={tmp_path}")
    built = [instantiate(node) for node in (cfg[group] or {}).values() if node and node.get("_target_")]
    kind = Logger if group == "logger" else Callback
    assert all(isinstance(item, kind) for item in built), built
    if option not in ("none",):
        assert built, f"{group}={option} builds nothing"
