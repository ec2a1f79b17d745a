"""Random size sampling per step (head.sizes_per_step) against plain reference computations."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mrl.errors import MRLError
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.size_sampling import SizeSampler
from mrl.training.assemble import build_module
from support import compose_train, reference_draw

NESTING = [2, 4, 8, 16, 32]


def drawn(weights: torch.Tensor) -> set[int]:
    assert set(weights.tolist()) <= {0.0, 1.0}
    return {g for g, w in enumerate(weights.tolist()) if w == 1.0}


def test_full_size_always_and_exactly_k_others_reproducible_by_seed_and_step():
    sampler = SizeSampler(len(NESTING), 2, seed=7)
    draws = [drawn(sampler.step_weights(step, "cpu")) for step in range(200)]
    assert all(len(d) == 3 and len(NESTING) - 1 in d for d in draws)
    for step in (0, 1, 57, 199):
        assert draws[step] == reference_draw(len(NESTING), 2, 7, step)
    # a new sampler (a resumed run) draws the same sizes at the same steps, in any order of steps
    again = SizeSampler(len(NESTING), 2, seed=7)
    assert [drawn(again.step_weights(s, "cpu")) for s in (199, 57, 0)] == [draws[199], draws[57], draws[0]]
    assert len({frozenset(d) for d in draws}) > 1  # it varies with the step
    other_seed = [drawn(SizeSampler(len(NESTING), 2, seed=8).step_weights(s, "cpu")) for s in range(200)]
    assert other_seed != draws


def test_draws_cover_every_size_uniformly_over_many_steps():
    k, steps = 2, 3000
    sampler = SizeSampler(len(NESTING), k, seed=0)
    subsets = Counter(frozenset(drawn(sampler.step_weights(s, "cpu"))) for s in range(steps))
    others = len(NESTING) - 1
    # every k-subset of the other sizes appears, each about equally often (C(4, 2) = 6 subsets)
    assert len(subsets) == len(list(itertools.combinations(range(others), k)))
    for count in subsets.values():
        assert abs(count / steps - 1 / len(subsets)) < 0.03
    fractions = sampler.drawn_fractions()
    assert fractions[-1] == 1.0
    assert torch.allclose(fractions[:-1], torch.full((others,), k / others), atol=0.03)
    assert sampler.drawn_fractions() is None  # read once: the count restarts


def test_k_zero_trains_the_full_size_only_and_k_max_every_size():
    assert drawn(SizeSampler(4, 0).step_weights(3, "cpu")) == {3}
    assert drawn(SizeSampler(4, 3).step_weights(3, "cpu")) == {0, 1, 2, 3}
    assert drawn(SizeSampler(1, 0).step_weights(0, "cpu")) == {0}  # a one-size head: just that size


@pytest.mark.parametrize("bad", [-1, 5, 2.0, True, "2"])
def test_bad_sizes_per_step(bad):
    with pytest.raises(MRLError, match=r"head.sizes_per_step=.* an integer from 0 to 4"):
        SizeSampler(len(NESTING), bad)


def test_the_objective_with_weights_and_a_sampler_draw_is_the_hand_written_sum():
    """MatryoshkaLoss(c, sampler=...): the sum over the drawn sizes of c_m * CE_m."""
    torch.manual_seed(3)
    logits = torch.randn(len(NESTING), 7, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (7,))
    c = [5.0, 4.0, 3.0, 2.0, 1.0]
    loss_fn = MatryoshkaLoss(c, sampler=SizeSampler(len(NESTING), 2, seed=11), label_smoothing=0.1).double()
    for step in (0, 7, 123):
        drawn = reference_draw(len(NESTING), 2, 11, step)
        expected = sum(c[g] * F.cross_entropy(logits[g], target, label_smoothing=0.1) for g in sorted(drawn))
        torch.testing.assert_close(loss_fn(logits, target, step=step), expected, rtol=1e-12, atol=1e-12)
        # draw + combine (what training does with several losses per batch) is the same sum
        per_size = loss_fn.per_size(logits, target)
        sizes = loss_fn.draw(step, "cpu")
        torch.testing.assert_close(loss_fn.combine(per_size, sizes), expected, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(loss_fn(logits, target, step=step), logits)
        assert [bool(grad[g].abs().sum() > 0) for g in range(len(NESTING))] == [
            g in drawn for g in range(len(NESTING))
        ]
    # evaluation (no step) and no sampler: every size
    every = sum(w * F.cross_entropy(lg, target, label_smoothing=0.1) for w, lg in zip(c, logits, strict=True))
    torch.testing.assert_close(loss_fn(logits, target), every, rtol=1e-12, atol=1e-12)
    assert MatryoshkaLoss(c).draw(5, "cpu") is None


def _module(*overrides: str):
    cfg = compose_train(
        "backbone.name=test_byobnet",
        "backbone.embed_dim=32",
        f"head.nesting=[{','.join(map(str, NESTING))}]",
        "head.weights=[5,4,3,2,1]",
        "seed=3",
        *overrides,
    )
    torch.manual_seed(0)
    return build_module(cfg, num_classes=6, in_chans=3, img_size=32).train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 6, (8,), generator=generator)


def reference_loss(module, x, y, sizes: set[int]) -> torch.Tensor:
    """sum over the drawn sizes of c_m * CE(z[:, :m] W_m^T + b_m, y), written out per size."""
    z = module.backbone(x)
    c = [5, 4, 3, 2, 1]
    total = torch.zeros(())
    for g in sorted(sizes):
        m = NESTING[g]
        logits = z[:, :m] @ module.head.size_weight(g).T + module.head.size_bias(g)
        total = total + c[g] * F.cross_entropy(logits, y, label_smoothing=0.1)
    return total


@pytest.mark.parametrize("step", [0, 5])
def test_training_loss_is_the_weighted_sum_over_the_drawn_sizes(step, monkeypatch):
    module = _module("head.sizes_per_step=2")
    monkeypatch.setattr(type(module), "global_step", property(lambda self: step))
    x, y = _batch()
    sizes = reference_draw(len(NESTING), 2, 3, step)
    loss = module._shared_step((x, y), "train", log_loss=False)
    assert loss.item() == pytest.approx(reference_loss(module, x, y, sizes).item(), rel=1e-5)
    loss.backward()
    # an undrawn size's own classifier gets no gradient; a drawn one does
    for g in range(len(NESTING)):
        moved = module.head.weight.grad[:, sum(NESTING[:g]) : sum(NESTING[: g + 1])].abs().sum() > 0
        assert bool(moved) == (g in sizes), (g, sizes)


def test_k_len_minus_one_equals_the_unsampled_loss_and_evaluation_uses_every_size():
    x, y = _batch()
    plain = _module()._shared_step((x, y), "train", log_loss=False)
    every = _module(f"head.sizes_per_step={len(NESTING) - 1}")
    assert every._shared_step((x, y), "train", log_loss=False).item() == pytest.approx(plain.item(), rel=1e-6)
    sampled = _module("head.sizes_per_step=0")
    with torch.no_grad():
        val = sampled._shared_step((x, y), "val", log_loss=False)
    assert val.item() == pytest.approx(
        reference_loss(sampled, x, y, set(range(len(NESTING)))).item(), rel=1e-5
    )
    train = sampled._shared_step((x, y), "train", log_loss=False)
    assert train.item() == pytest.approx(reference_loss(sampled, x, y, {len(NESTING) - 1}).item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_draw_stays_on_the_gpu_without_a_sync():
    sampler = SizeSampler(len(NESTING), 2, seed=0)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        weights = [sampler.step_weights(step, "cuda") for step in range(50)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    draws = [drawn(w.cpu()) for w in weights]
    assert all(len(d) == 3 and len(NESTING) - 1 in d for d in draws)
    again = SizeSampler(len(NESTING), 2, seed=0)
    assert [drawn(again.step_weights(s, "cuda").cpu()) for s in range(50)] == draws


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ({"sizes_per_step": -1}, "head.sizes_per_step=-1 is not valid"),
        ({"sizes_per_step": 1.5}, "head.sizes_per_step=1.5 is not valid"),
        ({"nesting": [4, 8, 16], "sizes_per_step": 3}, "at most 2 can be drawn each step"),
        ({"kind": "ff", "dim": 8, "sizes_per_step": 1}, "at most 0 can be drawn each step"),
        ({"depth_stages": [1, 1]}, "head.depth_stages=[1, 1] is not valid"),
        ({"depth_stages": [-1]}, "a list of distinct stage indices >= 0"),
        ({"depth_weight": "high"}, "head.depth_weight='high' is not valid"),
    ],
)
def test_preflight_refuses_bad_sampling_and_depth_settings(head, expected):
    from mrl.models.checks import check_head

    with pytest.raises(MRLError, match=re.escape(expected)):
        check_head(head)
    check_head({"nesting": [4, 8, 16], "sizes_per_step": 2, "depth_stages": [0, 2], "depth_weight": 0.5})
