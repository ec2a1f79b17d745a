"""Fine-tuning controls (the ``finetune`` node): which parameters train per setting (against timm's
``feature_info``), the backbone's learning rate in its own param groups, the frozen-then-unfrozen
schedule with frozen BatchNorm statistics, the bad settings, and one end-to-end run from a weights file."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mrl.errors import MRLError
from mrl.preflight import check_train
from mrl.training.assemble import build_module
from mrl.training.finetune import FinetuneSettings, StageFinetuning, finetune_callbacks
from support import TINY, compose_train, read_results

LR = 0.006  # conf/optim/adamw.yaml's lr, set explicitly below
MULT = 0.1


def _module(*overrides: str):
    cfg = compose_train(
        "backbone.name=test_byobnet", "backbone.embed_dim=16", "head.nesting=[4,8,16]", *overrides
    )
    torch.manual_seed(0)
    return build_module(cfg, num_classes=5, in_chans=3, img_size=32).train()


def _expected_trainable(model: torch.nn.Module, last: int) -> set[str]:
    """The timm model's parameters that train with its last ``last`` stages: those registered after the
    last parameter of the stage before them (timm registers modules in forward order)."""
    names = [n for n, _ in model.named_parameters()]
    if last == 0:
        return set()
    stages = [info["module"] for info in model.feature_info]
    if last == len(stages):
        return set(names)
    end = max(i for i, n in enumerate(names) if n.startswith(stages[-last - 1] + "."))
    return set(names[end + 1 :])


@pytest.mark.parametrize("last", [0, 1, 2, 4, 5])
def test_only_the_last_stages_the_projection_and_the_heads_train(last):
    module = _module()
    model = module.backbone.model
    assert [i["module"] for i in model.feature_info] == [
        "stem",
        "stages.0",
        "stages.1",
        "stages.2",
        "final_conv",
    ]
    StageFinetuning(FinetuneSettings(freeze_backbone=True, train_last_stages=last)).freeze_before_training(
        module
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model, last)
    if 0 < last < 5:
        assert not any(n.startswith("stem.") for n in trainable)  # the stem is frozen with the early stages
    outside = [p for n, p in module.named_parameters() if not n.startswith("backbone.model.")]
    assert outside and all(p.requires_grad for p in outside)  # projection and heads always train
    frozen_bn = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for name, bn in model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            assert bn.training == (bn.weight.requires_grad), name
    assert frozen_bn


def test_the_backbone_gets_its_own_param_groups_at_lr_times_the_multiplier():
    module = _module(f"optim.lr={LR}", "sched=none", f"finetune.backbone_lr_mult={MULT}")
    assert module.backbone_lr_mult == MULT
    optimizer = module.configure_optimizers()
    inside = {id(p) for p in module.backbone.model.parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        kinds = {id(p) in inside for p in group["params"]}
        assert len(kinds) == 1  # a group is all backbone or none of it
        expected = LR * MULT if kinds == {True} else LR
        assert group["lr"] == pytest.approx(expected)
        # timm's grouping kept in each part: no weight decay on biases and norms (1-D parameters)
        no_decay = [p.ndim <= 1 or names[id(p)].endswith(".bias") for p in group["params"]]
        assert all(flag == (group["weight_decay"] == 0) for flag in no_decay)
        seen |= {id(p) for p in group["params"]}
    assert seen == {id(p) for p in module.parameters()}


def test_without_finetune_settings_the_optimizer_is_built_as_before():
    module = _module(f"optim.lr={LR}", "sched=none")
    reference = module.optimizer_factory(module)
    optimizer = module.configure_optimizers()
    assert len(optimizer.param_groups) == len(reference.param_groups)
    for group, ref in zip(optimizer.param_groups, reference.param_groups, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
        assert group["lr"] == ref["lr"] and group["weight_decay"] == ref["weight_decay"]


class _Snapshots(L.Callback):
    """The backbone's weights, BatchNorm statistics and optimizer state at each epoch's end."""

    def __init__(self) -> None:
        self.weights, self.stats, self.state = [], [], []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        model = pl_module.backbone.model
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.stats.append({n: b.clone() for n, b in model.named_buffers() if "running" in n})
        optimizer = trainer.optimizers[0]
        self.state.append({n for n, p in model.named_parameters() if p in optimizer.state})


def _fit(module, epochs: int, callbacks: list, ckpt_path=None, root=None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=root is not None,
        default_root_dir=root,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_frozen_for_an_epoch_then_unfrozen(tmp_path):
    module = _module("optim.lr=0.01", "sched=none", f"finetune.backbone_lr_mult={MULT}")
    model = module.backbone.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    snapshots = _Snapshots()
    finetuning = StageFinetuning(FinetuneSettings(freeze_backbone=True, unfreeze_at_epoch=1))
    trainer = _fit(module, 2, [finetuning, snapshots])
    frozen, unfrozen = snapshots.weights
    assert all(torch.equal(frozen[n], before[n]) for n in before)  # epoch 0: not a weight moved
    assert all(torch.equal(snapshots.stats[0][n], stats_before[n]) for n in stats_before)  # nor BN stats
    assert snapshots.state[0] == set()  # and the optimizer kept no state for them
    assert any(not torch.equal(unfrozen[n], before[n]) for n in before)  # epoch 1: trained
    assert any(not torch.equal(snapshots.stats[1][n], stats_before[n]) for n in stats_before)
    assert snapshots.state[1] == set(before)
    assert all(p.requires_grad for p in model.parameters())
    lrs = sorted({g["lr"] for g in trainer.optimizers[0].param_groups})
    assert lrs == pytest.approx([0.01 * MULT, 0.01])


def test_a_run_resumed_after_the_frozen_epoch_unfreezes_with_its_param_groups(tmp_path):
    settings = FinetuneSettings(freeze_backbone=True, unfreeze_at_epoch=1)
    overrides = ("optim.lr=0.01", "sched=none", f"finetune.backbone_lr_mult={MULT}")
    first = _fit(_module(*overrides), 1, [StageFinetuning(settings)], root=tmp_path)
    checkpoint = first.checkpoint_callback.best_model_path
    module = _module(*overrides)
    frozen = {n: p.detach().clone() for n, p in module.backbone.model.named_parameters()}
    snapshots = _Snapshots()
    resumed = _fit(module, 2, [StageFinetuning(settings), snapshots], ckpt_path=checkpoint, root=tmp_path)
    (weights,) = snapshots.weights  # epoch 1 only
    assert all(p.requires_grad for p in module.backbone.model.parameters())
    assert any(not torch.equal(weights[n], frozen[n]) for n in frozen)
    lrs = sorted({g["lr"] for g in resumed.optimizers[0].param_groups})
    assert lrs == pytest.approx([0.01 * MULT, 0.01])


BAD = [
    (["finetune.freeze_backbone=true", "finetune.train_last_stages=-1"], "finetune.train_last_stages=-1"),
    (["finetune.freeze_backbone=true", "finetune.unfreeze_at_epoch=-2"], "finetune.unfreeze_at_epoch=-2"),
    (["finetune.backbone_lr_mult=-0.1"], "finetune.backbone_lr_mult=-0.1"),
    (["finetune.backbone_lr_mult=fast"], "finetune.backbone_lr_mult='fast'"),
    (["finetune.train_last_stages=2"], "finetune.freeze_backbone=false trains the whole backbone"),
    (
        ["finetune.freeze_backbone=true", "finetune.unfreeze_at_epoch=1", "trainer.max_epochs=1"],
        "would never unfreeze",
    ),
    (
        ["finetune.freeze_backbone=true", "finetune.unfreeze_at_epoch=0", "trainer=ddp_cpu"],
        "its gradients never averaged",
    ),
    (
        ["finetune.freeze_backbone=true", "objective=supcon", "backbone.embed_dim=null"],
        "leaves nothing for the contrastive loss to train",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[o[-1] for o, _ in BAD])
def test_bad_settings_are_refused_before_training(overrides, message):
    with pytest.raises(MRLError) as err:
        check_train(compose_train(*TINY, *overrides))
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one paragraph


def test_more_stages_than_the_backbone_has_are_refused_naming_them():
    module = _module()
    cfg = {"finetune": {"freeze_backbone": True, "train_last_stages": 6}}
    with pytest.raises(
        MRLError, match=r"train_last_stages=6 but backbone 'test_byobnet' has 5 stages"
    ) as err:
        finetune_callbacks(cfg, module.backbone)
    assert "4 (final_conv)" in str(err.value)
    assert finetune_callbacks(
        {"finetune": {"freeze_backbone": True, "train_last_stages": 5}}, module.backbone
    )
    assert finetune_callbacks({}, module.backbone) == []


@pytest.mark.slow
def test_finetuning_from_a_weights_file_end_to_end(run_cli, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "test_byobnet.safetensors"
    save_file(timm.create_model("test_byobnet", num_classes=0).state_dict(), str(weights))
    res = run_cli(
        "mrl-train",
        *TINY,
        "logger=csv",
        f"backbone.pretrained_path={weights}",
        "finetune.freeze_backbone=true",
        "finetune.train_last_stages=1",
        "finetune.unfreeze_at_epoch=1",
        "finetune.backbone_lr_mult=0.1",
        "trainer.max_epochs=2",
    )
    assert res.returncode == 0, res.output[-3000:]
    assert "Unfroze the backbone at epoch 1" in res.output
    (job,) = res.run_dirs()
    assert "test/acc@8" in read_results(job)
