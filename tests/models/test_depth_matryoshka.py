"""2D (depth x width) Matryoshka (head.depth_stages) against timm's intermediate features by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrl.errors import MRLError
from mrl.models.backbone import TimmBackbone
from mrl.models.stage_features import check_depth_stages
from mrl.training.assemble import build_module
from support import compose_train

NESTING = [2, 4, 8, 16]
C = [3, 1, 2, 1]  # relative importance c_m


def _module(*overrides: str):
    cfg = compose_train(
        "backbone.name=test_byobnet",
        "backbone.embed_dim=16",
        f"head.nesting=[{','.join(map(str, NESTING))}]",
        f"head.weights=[{','.join(map(str, C))}]",
        *overrides,
    )
    torch.manual_seed(0)
    return build_module(cfg, num_classes=5, in_chans=3, img_size=32).train()


def _batch():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, 5, (6,), generator=generator)


def matryoshka_ce(z: torch.Tensor, head, y: torch.Tensor, sizes=None) -> torch.Tensor:
    """sum_m c_m CE(z[:, :m] W_m^T + b_m, y) over ``sizes`` (default: all), one size at a time."""
    sizes = range(len(NESTING)) if sizes is None else sizes
    return sum(
        C[g]
        * F.cross_entropy(
            z[:, : NESTING[g]] @ head.size_weight(g).T + head.size_bias(g), y, label_smoothing=0.1
        )
        for g in sizes
    )


@pytest.mark.parametrize("kind", ["mrl", "mrl_e"])
def test_depth_loss_matches_timm_intermediate_features_by_hand(kind):
    module = _module(f"head={kind}", "head.depth_stages=[1,3]", "head.depth_weight=0.5")
    x, y = _batch()
    loss = module._shared_step((x, y), "train", log_loss=False)

    # reference: timm's own intermediate maps, pooled, projected, one Matryoshka CE per stage
    timm_model = module.backbone.model
    maps = timm_model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [m.shape[1] for m in maps] == [timm_model.feature_info[i]["num_chs"] for i in (1, 3)]
    final = matryoshka_ce(module.backbone(x), module.head, y)
    depth = 0
    for fmap, proj, head in zip(maps, module.depth.heads.projections, module.depth.heads.heads, strict=True):
        z_stage = fmap.mean(dim=(2, 3)) @ proj.weight.T + proj.bias
        depth = depth + matryoshka_ce(z_stage, head, y)
    assert loss.item() == pytest.approx((final + 0.5 * depth).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.depth.parameters())


def test_stages_reuse_the_final_heads_objective_and_checkpoints_keep_their_keys():
    module = _module("head.depth_stages=[1,3]", "head.sizes_per_step=1")
    assert module.depth.loss is module.criterion  # one objective: the same c_m, settings and draw
    x, y = _batch()
    stage_z = module.depth.embed(module.backbone, x)[1]
    sizes = module.criterion.draw(0, "cpu")
    with torch.no_grad():
        per_stage = [
            sum(C[g] * w * F.cross_entropy(head(z)[g], y, label_smoothing=0.1) for g, w in enumerate(sizes))
            for z, head in zip(stage_z, module.depth.heads.heads, strict=True)
        ]
        loss = module.depth.step_loss(stage_z, y, "train", sizes)
    assert loss.item() == pytest.approx((per_stage[0] + per_stage[1]).item(), rel=1e-5)
    # the state a checkpoint stores: the objective's c_m under both names (the keys checkpoints have)
    keys = {k for k in module.state_dict() if not k.startswith(("backbone.", "head.", "depth.heads."))}
    assert keys == {"criterion.weights", "depth.loss.weights"}


def test_depth_with_size_sampling_weighs_the_stage_losses_by_the_same_draw(monkeypatch):
    from support import reference_draw

    module = _module("head.depth_stages=[2]", "head.sizes_per_step=1", "seed=4")
    monkeypatch.setattr(type(module), "global_step", property(lambda self: 9))
    sizes = reference_draw(len(NESTING), 1, 4, 9)
    x, y = _batch()
    loss = module._shared_step((x, y), "train", log_loss=False)
    fmap = module.backbone.model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    proj, head = module.depth.heads.projections[0], module.depth.heads.heads[0]
    expected = matryoshka_ce(module.backbone(x), module.head, y, sizes) + matryoshka_ce(
        proj(fmap.mean(dim=(2, 3))), head, y, sizes
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_pass_gives_the_embedding_and_the_stage_maps():
    backbone = TimmBackbone("test_byobnet", in_chans=3, img_size=32, embed_dim=24).eval()
    x = _batch()[0]
    z, maps = backbone(x, stages=[0, 2])
    assert torch.allclose(z, backbone(x), atol=1e-6)
    reference = backbone.model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, reference, strict=True))


def test_eval_steps_log_every_stage_and_size_and_keep_the_final_keys():
    module = _module("head.depth_stages=[1,2]")
    x, y = _batch()
    with torch.no_grad():
        module._shared_step((x, y), "val", log_loss=False)
    values = module.depth.epoch_metrics("val")
    accuracies = {k: v for k, v in values.items() if "/acc@" in k}
    losses = {k: v for k, v in values.items() if "/loss@" in k}
    assert values.keys() == accuracies.keys() | losses.keys()
    assert set(accuracies) == {f"val/depth{s}/acc@{d}" for s in (1, 2) for d in NESTING}
    assert set(losses) == {f"val/depth{s}/loss@{d}" for s in (1, 2) for d in NESTING}
    head = module.depth.heads.heads[0]
    with torch.no_grad():
        z1 = module.depth.heads.projections[0](
            module.backbone.model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].mean(
                (2, 3)
            )
        )
        for g, d in enumerate(NESTING):
            logits = z1[:, :d] @ head.size_weight(g).T + head.size_bias(g)
            assert accuracies[f"val/depth1/acc@{d}"].item() == pytest.approx(
                (logits.argmax(1) == y).float().mean().item()
            )
            ce = F.cross_entropy(logits, y, label_smoothing=0.1)
            assert losses[f"val/depth1/loss@{d}"].item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([7], ["head.depth_stages=[7] is not valid", "0 (stem, 24 channels)", "3 (stages.2, 128 channels)"]),
        ([4], ["Stage 4 (final_conv) is the last one"]),
        ([1, 1], ["distinct"]),
        ([], ["is not valid"]),
        (2, ["head.depth_stages=2 is not valid"]),
    ],
)
def test_bad_stage_indices_list_the_available_stages(stages, expected):
    backbone = TimmBackbone("test_byobnet", in_chans=3, img_size=32)
    with pytest.raises(MRLError) as info:
        check_depth_stages(backbone, stages)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_a_backbone_without_intermediate_features_is_refused():
    backbone = TimmBackbone("test_byobnet", in_chans=3, img_size=32)
    backbone.model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # no timm API
    with pytest.raises(
        MRLError, match=r"intermediate features \(timm.s feature_info and forward_intermediates\).*does not"
    ):
        check_depth_stages(backbone, [1])


@pytest.mark.parametrize("name", ["resnet18", "test_vit", "test_convnext", "test_efficientnet"])
def test_other_timm_families_build_depth_heads_of_their_stage_widths(name):
    from mrl.models.depth import DepthMatryoshka
    from mrl.nn.matryoshka_linear import MatryoshkaLinear
    from mrl.nn.matryoshka_loss import MatryoshkaLoss

    backbone = TimmBackbone(name, in_chans=3, img_size=32, embed_dim=16)
    stages = [0, 1]
    depth = DepthMatryoshka(backbone, MatryoshkaLinear(16, 5, NESTING), stages, MatryoshkaLoss())
    widths = [backbone.model.feature_info[s]["num_chs"] for s in stages]
    assert [p.in_features for p in depth.heads.projections] == widths
    x, y = _batch()
    z, stage_z = depth.embed(backbone, x)
    assert z.shape == (6, 16) and all(s.shape == (6, 16) for s in stage_z)
    assert depth.step_loss(stage_z, y, "train").isfinite()


FAMILIES = [
    "test_byobnet",
    "resnet18",
    "test_vit",
    "test_convnext",
    "test_efficientnet",
    "mobilenetv3_small_050",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_one_pass_reproduces_the_models_own_embedding_and_feature_info_widths(name):
    """What depth heads rely on, per timm family: forward_intermediates + forward_head is the model's own
    forward (no second pass checks it at build time), and its maps are NCHW with feature_info's widths."""
    from mrl.models.stage_features import depth_stage_choices, stage_channels

    backbone = TimmBackbone(name, in_chans=3, img_size=32, embed_dim=16).eval()
    stages = depth_stage_choices(backbone)
    x = _batch()[0]
    with torch.no_grad():
        z, maps = backbone(x, stages=stages)
        torch.testing.assert_close(z, backbone(x), rtol=1e-4, atol=1e-5)
    assert all(m.dim() == 4 for m in maps)
    assert [m.shape[1] for m in maps] == stage_channels(backbone, stages)


def test_stage_features_that_are_not_nchw_maps_are_refused():
    from mrl.models.depth import DepthMatryoshka
    from mrl.nn.matryoshka_linear import MatryoshkaLinear
    from mrl.nn.matryoshka_loss import MatryoshkaLoss

    backbone = TimmBackbone("test_byobnet", in_chans=3, img_size=32)
    depth = DepthMatryoshka(backbone, MatryoshkaLinear(backbone.embed_dim, 5, NESTING), [1], MatryoshkaLoss())
    original = backbone.model.forward_intermediates

    def tokens(x, indices=None, **kwargs):  # (B, H*W, C) token sequences, as some ViTs can return
        final, maps = original(x, indices=indices, **kwargs)
        return final, [m.flatten(2).transpose(1, 2) for m in maps]

    backbone.model.forward_intermediates = tokens
    with pytest.raises(MRLError, match=r"not \(B, C, H, W\) maps"):
        depth.embed(backbone, _batch()[0])


def test_a_step_gets_the_stage_maps_from_one_call_of_the_backbone_module(monkeypatch):
    """What compile=true compiles is the backbone module's call (configure_model): the depth heads' maps
    come from it, in the one call that also gives the embedding."""
    module = _module("head.depth_stages=[1,3]")
    calls = []
    original = TimmBackbone.forward
    monkeypatch.setattr(
        TimmBackbone,
        "forward",
        lambda self, x, stages=None: calls.append(stages) or original(self, x, stages),
    )
    monkeypatch.setattr(module.backbone.model, "forward_intermediates", _only_through(module.backbone, calls))
    x, y = _batch()
    module._shared_step((x, y), "train", log_loss=False)
    with torch.no_grad():
        module._shared_step((x, y), "val", log_loss=False)
    assert calls == [[1, 3], [1, 3]]


def _only_through(backbone, calls):
    """timm's forward_intermediates, refusing to run outside a call of the backbone module."""
    original = backbone.model.forward_intermediates

    def guarded(*args, **kwargs):
        assert calls and calls[-1] is not None, "stage maps taken outside the backbone module's call"
        return original(*args, **kwargs)

    return guarded


@pytest.mark.slow
def test_compile_covers_the_stage_maps_in_one_graph():
    """compile=true compiles the backbone module; the depth heads' maps come from that module's call, which
    dynamo traces as one graph (no break back to eager Python)."""
    import torch._dynamo

    backbone = TimmBackbone("test_byobnet", in_chans=3, img_size=32, embed_dim=16)
    explained = torch._dynamo.explain(backbone)(_batch()[0], stages=[1, 3])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
