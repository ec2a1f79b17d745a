"""MatryoshkaLoss against a plain loop of cross-entropies, as the paper's code computes it."""

import pytest
import torch
import torch.nn.functional as F

from mrl import MatryoshkaLoss


def reference_loss(logits, target, weights=None, **kwargs):
    weights = [1.0] * logits.shape[0] if weights is None else weights
    return sum(w * F.cross_entropy(lg, target, **kwargs) for w, lg in zip(weights, logits, strict=True))


CASES = [
    {},
    {"weights": [2.0, 1.0, 1.0, 0.5]},
    {"label_smoothing": 0.1},
    {"ignore_index": 3},
    {"weights": [1.0, 2.0, 3.0, 4.0], "label_smoothing": 0.2, "ignore_index": 1},
    {"weight": [0.5, 1.0, 2.0, 1.0, 1.5, 1.0]},
    {"weight": [0.5, 1.0, 2.0, 1.0, 1.5, 1.0], "ignore_index": 0, "label_smoothing": 0.1},
    {"reduction": "sum"},
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_value_and_gradient_equal_reference(kwargs, fused):
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (9,))
    loss_fn = MatryoshkaLoss(fused=fused, **kwargs).double()
    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_kwargs = dict(kwargs)
    weights = ref_kwargs.pop("weights", None)
    if "weight" in ref_kwargs:
        ref_kwargs["weight"] = torch.tensor(ref_kwargs["weight"], dtype=torch.float64)
    ref = reference_loss(logits, target, weights, **ref_kwargs)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_per_size_losses():
    torch.manual_seed(1)
    logits, target = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    per_size = MatryoshkaLoss().per_size(logits, target)
    torch.testing.assert_close(per_size, torch.stack([F.cross_entropy(lg, target) for lg in logits]))


def test_weights_follow_the_module_and_the_logits_device():
    loss_fn = MatryoshkaLoss(weights=[1.0, 2.0])
    assert "weights" in dict(loss_fn.named_buffers())
    assert loss_fn.to(torch.float64).weights.dtype == torch.float64
    # Logits on another device (meta stands in for a GPU here): the weights are moved to them.
    logits = torch.randn(2, 4, 3, device="meta")
    target = torch.zeros(4, dtype=torch.long, device="meta")
    assert loss_fn(logits, target).device.type == "meta"


def test_wrong_number_of_weights_is_explained():
    with pytest.raises(ValueError, match="one weight per size"):
        MatryoshkaLoss(weights=[1.0, 2.0])(torch.randn(3, 2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("seed", range(6))
def test_fused_equals_per_size_on_random_shapes(seed):
    """Random size counts, batch sizes, class counts and importance weights, float64."""
    rng = torch.Generator().manual_seed(seed)
    sizes, batch, classes = (int(v) for v in torch.randint(1, 9, (3,), generator=rng))
    classes += 1
    logits = torch.randn(sizes, batch, classes, dtype=torch.float64, generator=rng, requires_grad=True)
    target = torch.randint(0, classes, (batch,), generator=rng)
    weights = torch.rand(sizes, generator=rng, dtype=torch.float64).tolist()
    fused = MatryoshkaLoss(weights, label_smoothing=0.1).double()
    ref = MatryoshkaLoss(weights, fused=False, label_smoothing=0.1).double()
    value, ref_value = fused(logits, target), ref(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    (ref_grad,) = torch.autograd.grad(ref_value, logits)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


# The one objective around any per-size loss: c_m, the sampler's draw, the per-size-loss protocol.

NESTING = [2, 4, 8, 16, 32]


class HalfSquaredNorm:
    """A per-size loss written for this test: the mean over rows of |z[:, :m]|^2 / 2 for every size m."""

    def per_size(self, z):
        return torch.stack([z[:, :m].square().sum(1).mean() / 2 for m in NESTING])


def test_any_per_size_loss_is_weighed_and_sampled_the_same_way():
    """The draw itself is checked against its documented rule in test_size_sampling.py; here: whatever
    it draws, exactly the drawn sizes are summed, each with its c_m."""
    from mrl.nn.size_sampling import SizeSampler

    z = torch.randn(6, 32, dtype=torch.float64)
    c = [1.0, 0.5, 2.0, 1.5, 3.0]
    sampler = SizeSampler(len(NESTING), 1, seed=2)
    loss_fn = MatryoshkaLoss(c, per_size_loss=HalfSquaredNorm(), sampler=sampler)
    drawn = [g for g, w in enumerate(SizeSampler(len(NESTING), 1, seed=2).step_weights(4, "cpu")) if w == 1]
    assert len(drawn) == 2 and drawn[-1] == len(NESTING) - 1
    expected = sum(c[g] * z[:, : NESTING[g]].square().sum(1).mean() / 2 for g in drawn)
    torch.testing.assert_close(loss_fn(z, step=4), expected)
    every = sum(w * z[:, :m].square().sum(1).mean() / 2 for w, m in zip(c, NESTING, strict=True))
    torch.testing.assert_close(loss_fn(z), every)
    torch.testing.assert_close(loss_fn.per_size(z), HalfSquaredNorm().per_size(z))


def test_cross_entropy_settings_beside_another_per_size_loss_are_refused():
    with pytest.raises(ValueError, match="configure that loss instead"):
        MatryoshkaLoss(per_size_loss=HalfSquaredNorm(), label_smoothing=0.1)
    with pytest.raises(ValueError, match="configure that loss instead"):
        MatryoshkaLoss(per_size_loss=HalfSquaredNorm(), fused=False)


def test_checkpoints_keep_their_keys_for_size_and_class_weights():
    """The objective's state is stored as a cross-entropy MatryoshkaLoss has always stored it
    (``weights``, ``class_weight``), and such a state loads back."""
    loss_fn = MatryoshkaLoss([1.0, 2.0], weight=[0.5, 1.0, 2.0])
    state = loss_fn.state_dict()
    assert set(state) == {"weights", "class_weight"}
    other = MatryoshkaLoss([3.0, 4.0], weight=[1.0, 1.0, 1.0])
    other.load_state_dict(
        {"weights": torch.tensor([1.0, 2.0]), "class_weight": torch.tensor([0.5, 1.0, 2.0])}
    )
    torch.testing.assert_close(other.per_size_loss.class_weight, torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(other.weights, torch.tensor([1.0, 2.0]))
    # nested (as in the LitModule): the key follows the module's prefix
    parent = torch.nn.ModuleDict({"criterion": MatryoshkaLoss(weight=[1.0, 2.0])})
    assert set(parent.state_dict()) == {"criterion.class_weight"}
    parent.load_state_dict({"criterion.class_weight": torch.tensor([3.0, 4.0])})
    torch.testing.assert_close(parent["criterion"].per_size_loss.class_weight, torch.tensor([3.0, 4.0]))
