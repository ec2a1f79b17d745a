"""The Matryoshka contrastive losses (SupCon, InfoNCE) against a plain per-size, per-anchor computation;
where their gradients go in the LitModule (backbone: the contrastive loss only; head: the probe only);
the two augmented views the datamodules serve; and objective=supcon / infonce end to end."""

from __future__ import annotations

import pytest
import torch

from mrl.data.fashion_mnist import FashionMNISTDataModule
from mrl.data.preprocess import normalize_uint8_batch
from mrl.data.synthetic import SyntheticDataModule
from mrl.errors import MRLError
from mrl.nn.matryoshka_contrastive import MatryoshkaContrastiveLoss, matryoshka_contrastive_per_size
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.training.assemble import build_module
from support import TINY, compose_train, in_gloo_processes, read_results, wandb_history, wandb_run_dirs

NESTING = [1, 2, 4, 8, 16]


def reference(z, nesting, views, labels, temperature, weights):
    """Per-size losses and their weighted sum, written out: a loop over sizes and anchors, each prefix
    normalised explicitly, log-softmax over every other row, minus the mean over the anchor's positives."""
    n = z.shape[0]
    batch = n // views
    keys = (labels if labels is not None else torch.arange(batch)).repeat(views).tolist()
    losses = []
    for m in nesting:
        prefix = z[:, :m] / z[:, :m].norm(dim=1, keepdim=True)
        sim = prefix @ prefix.T / temperature
        total, anchors = 0.0, 0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            log_prob = torch.log_softmax(sim[i, others], dim=0)
            positives = [k for k, j in enumerate(others) if keys[j] == keys[i]]
            if positives:
                total = total - log_prob[positives].mean()
                anchors += 1
        losses.append(total / anchors)
    per_size = torch.stack(losses)
    return per_size, (torch.tensor(weights, dtype=z.dtype) * per_size).sum()


@pytest.mark.parametrize("kind", ["supcon", "infonce"])
@pytest.mark.parametrize("views", [2, 3])
def test_per_size_losses_and_gradients_match_the_reference(kind, views):
    torch.manual_seed(0)
    batch = 6
    z = torch.randn(views * batch, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 0, 3])  # class 3 once: its anchors' positives are its other views
    weights = [4.0, 2.0, 1.0, 0.5, 1.0]
    loss_fn = MatryoshkaContrastiveLoss(NESTING, kind=kind, temperature=0.3, views=views)
    per_size = loss_fn.per_size(z, labels)
    total = MatryoshkaLoss(weights=weights).combine(per_size)  # the one weighting of per-size losses
    ref_per_size, ref_total = reference(z, NESTING, views, labels if kind == "supcon" else None, 0.3, weights)
    torch.testing.assert_close(per_size, ref_per_size)
    torch.testing.assert_close(total, ref_total)
    (grad,) = torch.autograd.grad(total, z)
    (ref_grad,) = torch.autograd.grad(ref_total, z)
    torch.testing.assert_close(grad, ref_grad)
    assert per_size.shape == (len(NESTING),)


def test_contrastive_losses_are_a_per_size_loss_of_the_objective():
    torch.manual_seed(0)
    z = torch.randn(12, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 0, 3])
    c = [4.0, 2.0, 1.0, 0.5, 1.0]
    loss_fn = MatryoshkaLoss(c, per_size_loss=MatryoshkaContrastiveLoss(NESTING, "supcon", 0.3, views=2))
    _, expected = reference(z, NESTING, 2, labels, 0.3, c)
    torch.testing.assert_close(loss_fn(z, labels), expected)


def test_infonce_with_two_views_is_nt_xent_and_supcon_without_shared_classes_equals_it():
    torch.manual_seed(1)
    z = torch.randn(8, 4, dtype=torch.float64)
    p = torch.nn.functional.normalize(z, dim=1)
    logits = (p @ p.T / 0.5).fill_diagonal_(float("-inf"))
    partner = torch.arange(8).roll(4)  # row i's other view is i + B mod 2B
    nt_xent = torch.nn.functional.cross_entropy(logits, partner)
    per_size = matryoshka_contrastive_per_size(z, [4], views=2, temperature=0.5)
    torch.testing.assert_close(per_size, nt_xent.reshape(1))
    distinct = torch.arange(4)  # every image its own class: SupCon's positives are InfoNCE's
    torch.testing.assert_close(
        matryoshka_contrastive_per_size(z, [4], views=2, labels=distinct, temperature=0.5), per_size
    )


def _tiny_module(objective: str, *overrides: str):
    cfg = compose_train(
        *TINY, f"objective={objective}", "head.nesting=[2,4,8]", "backbone.embed_dim=8", *overrides
    )
    return build_module(cfg, num_classes=4, in_chans=3, img_size=16).double()


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    backbone = {n: p.grad.clone() for n, p in module.backbone.named_parameters() if p.grad is not None}
    head = {n: p.grad for n, p in module.head.named_parameters()}
    return backbone, head


def test_backbone_learns_from_the_contrastive_loss_only_and_the_probe_from_the_head_only():
    torch.manual_seed(0)
    module = _tiny_module("supcon").train()
    x = torch.randn(2, 6, 3, 16, 16, dtype=torch.float64)  # (views, B, C, H, W)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    total = module._shared_step((x, y), "train", log_loss=False)
    backbone_total, head_total = _grads(module, total)
    # the contrastive loss alone, computed by hand from the same forward pass
    z = module(x.flatten(0, 1))
    contrastive = module.criterion.combine(module.criterion.per_size(z, y))
    backbone_contrastive, head_contrastive = _grads(module, contrastive)
    # the gradient reaches the first layer (some residual branches start at zero, so not every tensor)
    first = next(iter(backbone_total))
    assert "stem" in first and backbone_total[first].abs().sum() > 0
    assert backbone_total.keys() == backbone_contrastive.keys()
    for name, grad in backbone_total.items():
        torch.testing.assert_close(grad, backbone_contrastive[name], msg=name)  # the probe adds nothing
    assert all(g is None for g in head_contrastive.values())
    assert all(g is not None and g.abs().sum() > 0 for g in head_total.values())


class Training:
    """What the training-time augmentation reads off the trainer (a step into the first epoch)."""

    training, current_epoch, global_step, global_rank = True, 0, 3, 0


def _views(dm, x, y):
    dm.trainer = Training()
    out, labels = dm.on_after_batch_transfer((x.clone(), y), 0)
    dm.trainer = None
    assert torch.equal(labels, y)
    return out


def test_synthetic_views_are_independent_flips():
    dm = SyntheticDataModule(img_size=16, train_size=64, batch_size=32, in_memory=True)
    dm.setup()
    dm.configure_views(2)
    x, y = next(iter(dm.train_dataloader()))
    views = _views(dm, x, y)
    assert views.shape == (2, *x.shape)
    plain = normalize_uint8_batch(x, *dm._stats, flip=False)
    for view in views:
        same, flipped = (view == plain).flatten(1).all(1), (view == plain.flip(-1)).flatten(1).all(1)
        assert bool((same | flipped).all())  # each view: the image or its mirror
    assert not torch.equal(views[0], views[1])  # independent draws
    torch.testing.assert_close(_views(dm, x, y), views)  # a function of (seed, epoch, step): resumable
    assert dm.model_inputs((x, y))[0].shape == x.shape  # evaluation: one view


def test_fashion_mnist_views_are_each_a_crop_and_flip_of_the_image(tiny_fashion_mnist):
    dm = FashionMNISTDataModule(str(tiny_fashion_mnist), val_size=50, batch_size=16, crop_padding=2)
    dm.setup()
    dm.configure_views(2)
    x, y = next(iter(dm.train_dataloader()))
    views = _views(dm, x, y)
    assert views.shape == (2, 16, 1, 28, 28)
    # every crop offset and flip of every image, normalised as the datamodule does
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    candidates = torch.stack(
        [padded[..., dy : dy + 28, dx : dx + 28] for dy in range(5) for dx in range(5)], dim=1
    )  # (B, 25, C, H, W)
    candidates = torch.cat([candidates, candidates.flip(-1)], dim=1)
    normalised = normalize_uint8_batch(candidates.flatten(0, 1), *dm._stats, flip=False).view(
        *candidates.shape
    )
    for view in views:
        match = (normalised == view[:, None]).flatten(2).all(2)  # (B, 50)
        assert bool(match.any(1).all()), "a view is not a padded crop (+ flip) of its image"
    assert not torch.equal(views[0], views[1])


def test_views_without_augmentation_are_refused(tiny_fashion_mnist):
    dm = FashionMNISTDataModule(str(tiny_fashion_mnist), val_size=50, batch_size=16, augment=False)
    with pytest.raises(MRLError, match=r"objective.views=2 with data.augment=false"):
        dm.configure_views(2)
    dm.configure_views(1)


def test_size_sampling_weighs_the_contrastive_losses_of_undrawn_sizes_by_zero(monkeypatch):
    """objective=supcon with head.sizes_per_step: the contrastive loss is the weighted sum over this
    step's drawn sizes only (the reference loop above restricted to them), while the detached probe's
    cross-entropy counts every size."""
    torch.manual_seed(0)
    module = _tiny_module("supcon", "head.sizes_per_step=1").train()
    monkeypatch.setattr(type(module), "global_step", property(lambda self: 3))
    weights = module.criterion.sampler.step_weights(3, torch.device("cpu"))
    drawn = [g for g in range(3) if weights[g] > 0]
    assert len(drawn) == 2 and 2 in drawn  # the full size and one other
    x = torch.randn(2, 6, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    total = module._shared_step((x, y), "train", log_loss=False)
    z = module(x.flatten(0, 1))
    per_size, _ = reference(z, [2, 4, 8], 2, y.repeat(2), 0.1, [1, 1, 1])
    expected = sum(per_size[g] for g in drawn)
    # the contrastive loss, recomputed by the module's own path for the same step
    _, _, _, contrastive = module._contrastive_step(x, y, weights, False)
    torch.testing.assert_close(contrastive, expected)
    probe = sum(
        torch.nn.functional.cross_entropy(
            z[:, :m] @ module.head.size_weight(g).T + module.head.size_bias(g),
            y.repeat(2),
            label_smoothing=0.1,
        )
        for g, m in enumerate([2, 4, 8])
    )
    torch.testing.assert_close(total, expected + probe)


def test_depth_heads_beside_a_contrastive_objective_are_refused_before_training():
    from mrl.models.checks import check_depth_with_objective

    with pytest.raises(MRLError, match=r"head\.depth_stages=\[1\] with objective=supcon"):
        check_depth_with_objective({"depth_stages": [1]}, {"kind": "supcon", "views": 2})
    check_depth_with_objective({"depth_stages": [1]}, {"kind": "ce", "views": 1})
    check_depth_with_objective({"depth_stages": None}, {"kind": "infonce", "views": 2})


def test_image_file_data_refuses_two_views_and_configs_refuse_mismatched_views(tiny_image_tree):
    from mrl.data.image_folder import ImageFolderDataModule
    from mrl.models.checks import check_objective

    dm = ImageFolderDataModule(root=str(tiny_image_tree), img_size=32)
    with pytest.raises(MRLError, match="Two views work with data=fashion_mnist"):
        dm.configure_views(2)
    dm.configure_views(1)
    with pytest.raises(MRLError, match="cross-entropy trains on one view"):
        check_objective({"kind": "ce", "views": 2})
    with pytest.raises(MRLError, match="at least two"):
        check_objective({"kind": "supcon", "views": 1})
    with pytest.raises(MRLError, match=r"objective\.temprature is not an objective setting"):
        check_objective({"kind": "supcon", "temprature": 0.1, "views": 2})
    with pytest.raises(MRLError, match=r"objective\.kind='simclr'"):
        check_objective({"kind": "simclr", "views": 2})
    with pytest.raises(
        MRLError, match=r"objective\.gather_negatives='yes'.*objective\.gather_negatives=true"
    ):
        check_objective({"kind": "supcon", "views": 2, "gather_negatives": "yes"})


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["supcon", "infonce"])
def test_contrastive_training_end_to_end(run_cli, objective):
    result = run_cli(
        "mrl-train", *TINY, f"objective={objective}", "head.nesting=[2,4,8]", "backbone.embed_dim=8"
    )
    assert result.returncode == 0, result.output[-3000:]
    (run,) = result.run_dirs()
    results = read_results(run)
    for stage in ("train", "val", "test"):
        assert all(0 <= results[f"{stage}/acc@{d}"] <= 1 for d in (2, 4, 8))
    assert all(results[f"train/contrastive_loss@{d}"] > 0 for d in (2, 4, 8))
    history = wandb_history(wandb_run_dirs(run)[0])
    steps = [row for row in history if "train/contrastive_loss" in row]
    assert len(steps) == 4  # 128 images / batch 32, logged every step
    epoch = [row for row in history if "train/contrastive_loss@8" in row]
    assert len(epoch) == 1 and all(f"train/contrastive_loss@{d}" in epoch[0] for d in (2, 4, 8))
    assert any("train/loss" in row for row in history)  # the probe's loss, as for cross-entropy
    assert (run / "checkpoints").is_dir()


def test_two_views_of_image_files_are_refused_before_anything_runs(run_main, tiny_image_tree):
    result = run_main(
        "mrl-train", "data=imagefolder", f"data.root={tiny_image_tree}", "objective=supcon", "logger=none"
    )
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "objective.views=2" in result.output and "use objective=ce" in result.output, result.output
    assert "Seed set" not in result.output  # refused before training started
    written = [p for run in result.run_dirs() for p in run.rglob("*") if p.is_file()]
    assert all(".hydra" in p.parts or p.suffix == ".log" for p in written), written


def test_mrl_report_makes_a_row_per_objective(tmp_path):
    from mrl.compare.collect import collect_jobs
    from mrl.compare.table import aggregate
    from support import top1_results as _top1
    from support import write_job_dir as _job

    supcon = {"kind": "supcon", "temperature": 0.1, "views": 2}
    _job(tmp_path / "0", {"kind": "mrl"}, 0, _top1({8: 0.9}), ("objective=ce",), objective={"kind": "ce"})
    _job(tmp_path / "1", {"kind": "mrl"}, 0, _top1({8: 0.8}), ("objective=supcon",), objective=supcon)
    _job(tmp_path / "2", {"kind": "mrl"}, 1, _top1({8: 0.6}), ("objective=supcon",), objective=supcon)
    _job(
        tmp_path / "3",
        {"kind": "mrl"},
        0,
        _top1({8: 0.7}),
        ("objective=infonce",),
        objective={"kind": "infonce"},
    )
    _job(
        tmp_path / "4", {"kind": "mrl"}, 1, _top1({8: 0.95}), (), objective=None
    )  # before the objective group
    records, infos = collect_jobs(tmp_path)
    assert {i.job: i.method for i in infos} == {
        "0": "mrl",
        "1": "mrl+supcon",
        "2": "mrl+supcon",
        "3": "mrl+infonce",
        "4": "mrl",
    }
    top1 = aggregate(records)["top1"]
    assert list(top1) == ["mrl", "mrl+supcon", "mrl+infonce"]
    assert top1["mrl+supcon"][8].mean == pytest.approx(70.0) and top1["mrl+supcon"][8].n == 2


# ---- contrastive negatives across processes (DDP) -------------------------------------------------------

DDP_CASES = [("supcon", True), ("infonce", True), ("supcon", False)]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of 8 images (V, B, F) with 3 classes, the same in every process."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 16)


def _ddp_rank(rank: int) -> dict:
    """One of two gloo processes: its half of the images (both views) through a DDP-wrapped model, each
    case's per-size losses and DDP's averaged gradients."""
    from torch.nn.parallel import DistributedDataParallel

    x, y = _global_batch()
    mine = slice(rank * 4, rank * 4 + 4)
    found = {}
    for kind, gather in DDP_CASES:
        model = DistributedDataParallel(_model())
        loss = MatryoshkaContrastiveLoss(NESTING, kind=kind, temperature=0.3, views=2, gather=gather)
        per_size = loss.per_size(model(x[:, mine].flatten(0, 1)), y[mine])
        per_size.sum().backward()
        found[kind, gather] = (per_size.detach(), [p.grad.clone() for p in model.parameters()])
    return found


@pytest.mark.slow
def test_ddp_gathers_negatives_to_the_single_process_loss_and_gradients():
    ranks = in_gloo_processes(_ddp_rank)
    found = {(rank, *case): result for rank, cases in enumerate(ranks) for case, result in cases.items()}
    x, y = _global_batch()
    for kind, gather in DDP_CASES:
        model = _model()  # one process, the whole global batch (rows view-major over all 8 images)
        single = MatryoshkaContrastiveLoss(NESTING, kind=kind, temperature=0.3, views=2).per_size(
            model(x.flatten(0, 1)), y
        )
        single.sum().backward()
        # the processes' mean loss (what DDP's averaged gradients minimise)
        mean = (found[0, kind, gather][0] + found[1, kind, gather][0]) / 2
        if not gather:  # each process contrasts its own half: fewer negatives, another loss
            assert not torch.allclose(mean, single, atol=1e-3)
            continue
        torch.testing.assert_close(mean, single.detach(), rtol=1e-5, atol=1e-6)
        for rank in range(2):
            for grad, want in zip(found[rank, kind, gather][1], model.parameters(), strict=True):
                torch.testing.assert_close(grad, want.grad, rtol=1e-4, atol=1e-6)
