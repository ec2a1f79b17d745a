"""Post-hoc models (``mrl-train source=...``): the frozen source and its trained feature head built from a
model description, checked against the chain written out by hand from their weights; the source stays
frozen; the description and the one-file export round-trip; bad settings are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import mrl
import mrl.nn.cross_entropy as cross_entropy
from mrl.errors import MRLError
from mrl.models.build import build_model
from mrl.models.posthoc import PosthocBackbone, Projection, build_feature_head
from mrl.models.spec import UINT8, FeatureHead, ModelSpec, Preprocessing
from mrl.nn.folded_cross_entropy import fold_pays
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.training.posthoc_module import PosthocLitModule
from support import torch_threads

SOURCE_WIDTH = 256  # test_byobnet's pooled features
SOURCE = ModelSpec(
    backbone="test_byobnet",
    num_classes=5,
    img_size=32,
    head="mrl",
    nesting=(4, 8, 16),
    preprocessing=Preprocessing(UINT8, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _spec(kind: str, settings: dict, nesting=(4, 8, 16)) -> ModelSpec:
    return replace(SOURCE, nesting=nesting, feature_head=FeatureHead(kind, SOURCE_WIDTH, settings))


def _by_hand(kind: str, module: torch.nn.Module, f: torch.Tensor, k: int) -> torch.Tensor:
    """z of the source's features ``f`` from the feature head's weights, written out."""
    state = module.state_dict()
    if kind == "linear":
        return f @ state["net.weight"].T + state["net.bias"]
    if kind == "mlp":
        hidden = F.gelu(f @ state["net.0.weight"].T + state["net.0.bias"])
        return hidden @ state["net.2.weight"].T + state["net.2.bias"]
    if kind == "csr":  # the k largest pre-activations of each row, ReLU'd, zeros elsewhere
        pre = (f - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
        kept = pre >= pre.topk(k, dim=1).values[:, -1:]
        return torch.where(kept, pre.clamp(min=0), torch.zeros_like(pre))
    hidden = torch.relu(f @ state["residual.0.weight"].T + state["residual.0.bias"])
    return f + hidden @ state["residual.2.weight"].T + state["residual.2.bias"]


CASES = [  # (by-hand form, feature head kind, settings, z width)
    ("linear", "projection", {"dim": None, "hidden": None}, SOURCE_WIDTH),
    ("linear", "projection", {"dim": 32, "hidden": None}, 32),
    ("mlp", "projection", {"dim": 32, "hidden": 64}, 32),
    ("csr", "csr", {"expansion": 2}, 2 * SOURCE_WIDTH),
    ("adaptor", "adaptor", {"hidden_features": 64}, SOURCE_WIDTH),
]


@pytest.mark.parametrize(("form", "kind", "settings", "width"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_the_chain_is_the_feature_head_on_the_frozen_sources_features(form, kind, settings, width):
    torch.manual_seed(0)
    backbone, head, spec = build_model(_spec(kind, settings))
    assert isinstance(backbone, PosthocBackbone) and backbone.embed_dim == width
    assert head.in_features == width and spec.embed_dim == width
    feature_head = backbone.feature_head
    with torch.no_grad():  # the adaptor starts as the identity: give its last layer weights to check
        for p in feature_head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(6, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        f = backbone.source(x)
        z = backbone(x)
        assert f.shape == (6, SOURCE_WIDTH) and z.shape == (6, width)
        torch.testing.assert_close(z, _by_hand(form, feature_head, f, 16), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backbone.encode_features(f), z)
    if form == "csr":
        assert ((z != 0).sum(1) <= 16).all()  # the code of the largest k


def test_the_source_stays_frozen_in_training_mode():
    torch.manual_seed(0)
    backbone, _, _ = build_model(_spec("projection", {}))
    backbone.train()
    source = backbone.source
    assert not source.training and all(m.training is False for m in source.modules())
    assert not any(p.requires_grad for p in source.parameters())
    assert all(p.requires_grad for p in backbone.feature_head.parameters())
    stats = {n: b.clone() for n, b in source.named_buffers()}
    backbone(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(stats[n], b) for n, b in source.named_buffers())  # BatchNorm statistics too
    assert all(p.grad is None for p in source.parameters())
    assert all(p.grad is not None for p in backbone.feature_head.parameters())


@pytest.mark.parametrize("kind", ["projection", "csr", "adaptor"])
def test_the_description_and_the_export_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    settings = {"expansion": 2} if kind == "csr" else {}
    model = mrl.MatryoshkaModel(_spec(kind, settings))
    stored = model.spec.to_dict()
    assert stored["feature_head"] == {"kind": kind, "in_features": SOURCE_WIDTH, "settings": settings}
    assert ModelSpec.from_dict(stored) == model.spec
    loaded = mrl.load(model.save(tmp_path / "model.safetensors"))
    assert loaded.spec == model.spec
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # raw images, as the data stores them
    torch.testing.assert_close(loaded.embed(images, normalize=False), model.embed(images, normalize=False))


def test_bad_feature_head_settings_are_refused():
    with pytest.raises(MRLError, match=r"expansoin is not a setting of the csr head; it takes expansion"):
        build_feature_head(FeatureHead("csr", SOURCE_WIDTH, {"expansoin": 4}), [8])
    with pytest.raises(MRLError, match=r"features.projection_dim=0 and features.hidden=None"):
        Projection(SOURCE_WIDTH, dim=0)
    with pytest.raises(MRLError, match="k values go up to 2048 but its hidden layer has only 512 units"):
        build_feature_head(FeatureHead("csr", SOURCE_WIDTH, {"expansion": 2}), [8, 2048])
    with pytest.raises(ValueError, match="feature head kind 'pca' is none of projection, csr, adaptor"):
        FeatureHead.from_dict({"kind": "pca", "in_features": 8, "settings": {}})


@pytest.mark.parametrize("form", ["linear", "mlp"])
def test_a_projections_training_step_folds_it_into_the_head_with_the_same_results(form, monkeypatch):
    """PosthocLitModule's training step on cached features: the folded node (mrl.nn.folded_cross_entropy)
    runs where it pays (10 classes of sizes up to 256 on a 256-wide projection) and gives the loss and
    every trained parameter's gradient of the step that forms z; an MLP folds its last layer."""
    torch.manual_seed(0)
    settings = {"dim": None, "hidden": 64 if form == "mlp" else None}
    spec = replace(_spec("projection", settings, nesting=(1, 4, 16, 64, 256)), num_classes=10)
    backbone, head, _ = build_model(spec)
    module = PosthocLitModule(backbone, head, MatryoshkaLoss(), spec=spec).double()
    module.log = lambda *args, **kwargs: None  # no trainer here
    features, labels = torch.randn(32, SOURCE_WIDTH, dtype=torch.float64), torch.randint(0, 10, (32,))
    trained = [p for p in module.parameters() if p.requires_grad]

    def step(fold: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(cross_entropy, "fold_pays", lambda *args: fold)
        loss = module._shared_step((features, labels), "train", log_loss=False)
        return loss, torch.autograd.grad(loss, trained)

    calls = []
    folded_ce = cross_entropy.folded_matryoshka_cross_entropy
    monkeypatch.setattr(
        cross_entropy,
        "folded_matryoshka_cross_entropy",
        lambda *a, **k: calls.append(1) or folded_ce(*a, **k),
    )
    loss, grads = step(fold=True)
    assert calls == [1]
    expected_loss, expected_grads = step(fold=False)
    assert calls == [1]
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grads, expected_grads)
    body, last = backbone.feature_head.split_last()
    h = features if body is None else body(features)
    assert fold_pays(h.float(), last.float(), 10, spec.nesting, False)  # what the step above forced
