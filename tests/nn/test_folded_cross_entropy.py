"""A projection folded into the Matryoshka head (one node) against projection, per-size logits and one
F.cross_entropy per size (float64), and the rule that decides when training folds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrl import MatryoshkaLinear
from mrl.nn.cross_entropy import MatryoshkaCrossEntropy
from mrl.nn.folded_cross_entropy import (
    direct_multiply_adds,
    fold_pays,
    folded_matryoshka_cross_entropy,
    folded_multiply_adds,
)

CLASSES = 7
# Sizes that stop short of the projection's width (its last rows feed no logit), a single size, sizes
# narrower than a BLAS-friendly width.
NESTINGS = [[1, 2, 4, 8], [3, 5, 12, 20], [24], [2, 9, 31]]
CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1, "ignore_index": 3},
    {"weight": [0.5, 1.0, 2.0, 1.0, 1.5, 1.0, 0.7], "reduction": "sum"},
]


def reference_losses(h, proj_w, proj_b, head_w, head_b, nesting, efficient, target, **ce):
    """z = h P^T + p, then each size's logits from its own columns and F.cross_entropy per size."""
    z = h @ proj_w.t() + (0 if proj_b is None else proj_b)
    losses, offset = [], 0
    for g, m in enumerate(nesting):
        w = head_w[:, :m] if efficient else head_w[:, offset : offset + m]
        offset += m
        logits = z[:, :m] @ w.t()
        if head_b is not None:
            logits = logits + (head_b if efficient else head_b[g])
        losses.append(F.cross_entropy(logits, target, **ce))
    return torch.stack(losses), z


@pytest.mark.parametrize("nesting", NESTINGS)
@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("options", CE_OPTIONS)
def test_folded_losses_predictions_and_gradients_equal_the_unfolded_step(nesting, efficient, biases, options):
    torch.manual_seed(0)
    batch, in_features, dim = 13, 11, 32
    proj_bias, head_bias = biases
    dtype = torch.float64
    h = torch.randn(batch, in_features, dtype=dtype, requires_grad=True)
    proj_w = torch.randn(dim, in_features, dtype=dtype, requires_grad=True)
    proj_b = torch.randn(dim, dtype=dtype, requires_grad=True) if proj_bias else None
    width = nesting[-1] if efficient else sum(nesting)
    head_w = torch.randn(CLASSES, width, dtype=dtype, requires_grad=True)
    bias_shape = (CLASSES,) if efficient else (len(nesting), CLASSES)
    head_b = torch.randn(bias_shape, dtype=dtype, requires_grad=True) if head_bias else None
    target = torch.randint(0, CLASSES, (batch,))
    target[:3] = 3  # some rows hit ignore_index where it is set
    ce = dict(options)
    if "weight" in ce:
        ce["weight"] = torch.tensor(ce["weight"], dtype=dtype)
    upstream = torch.randn(len(nesting), dtype=dtype)  # unequal per-size weights reach every gradient
    inputs = [t for t in (h, proj_w, proj_b, head_w, head_b) if t is not None]

    expected, z = reference_losses(h, proj_w, proj_b, head_w, head_b, nesting, efficient, target, **ce)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    class_weight = ce.pop("weight", None)
    losses, predictions = folded_matryoshka_cross_entropy(
        h,
        proj_w,
        proj_b,
        head_w,
        head_b,
        target,
        nesting,
        efficient,
        class_weight=class_weight,
        predict=True,
        **ce,
    )
    grads = torch.autograd.grad((losses * upstream).sum(), inputs)

    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    head = MatryoshkaLinear(dim, CLASSES, nesting, efficient=efficient, bias=head_bias).double()
    with torch.no_grad():
        head.weight.copy_(head_w)
        if head_bias:
            head.bias.copy_(head_b)
        assert torch.equal(predictions, head.forward_reference(z).argmax(2))


def test_projection_rows_past_the_largest_size_get_zero_gradient():
    torch.manual_seed(1)
    h = torch.randn(8, 5, dtype=torch.float64)
    proj = nn.Linear(5, 16).double()
    head = MatryoshkaLinear(16, CLASSES, [2, 4], efficient=False).double()
    losses = folded_matryoshka_cross_entropy(
        h, proj.weight, proj.bias, head.weight, head.bias, torch.randint(0, CLASSES, (8,)), [2, 4], False
    )
    losses.sum().backward()
    assert proj.weight.grad[4:].abs().max() == 0 and proj.bias.grad[4:].abs().max() == 0
    assert proj.weight.grad[:4].abs().max() > 0


def test_backward_twice_is_refused():
    h = torch.randn(4, 3)
    proj, head = nn.Linear(3, 8), MatryoshkaLinear(8, 5, [4, 8])
    losses = folded_matryoshka_cross_entropy(
        h, proj.weight, proj.bias, head.weight, head.bias, torch.tensor([0, 1, 2, 3]), [4, 8], False
    )
    losses.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        losses.sum().backward()


def test_multiply_add_counts():
    # Written out: projection 256 -> 256 at batch 256, nine sizes 1 ... 256, 10 classes.
    nesting = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert direct_multiply_adds(256, 256, 256, 10, nesting, False, False) == 2 * 256**3 + 3 * 256 * 10 * 511
    assert (
        folded_multiply_adds(256, 256, 10, nesting, False, False) == 3 * 10 * 511 * 257 + 2 * 256 * 90 * 256
    )
    assert direct_multiply_adds(4, 3, 8, 2, [4, 8], True, True) == 3 * 4 * 3 * 8 + 3 * 4 * 2 * 8
    assert folded_multiply_adds(4, 3, 2, [4, 8], True, True) == 3 * 2 * 8 * 4 + 3 * 4 * 2 * 2 * 3


@pytest.mark.parametrize(
    ("in_features", "dim", "classes", "folds"),
    [
        (256, 256, 10, True),  # Fashion-MNIST's recipe: 90 classifier rows against 256 features
        (2048, 2048, 10, True),  # CIFAR-10 on ResNet-50 features
        (2048, 2048, 1000, False),  # ImageNet: 9000 rows, more than the embedding's width
    ],
)
def test_training_folds_only_where_it_saves_work(in_features, dim, classes, folds):
    nesting = [2**i for i in range(3, 12)] if dim == 2048 else [2**i for i in range(9)]
    if folds:  # the ratios docs/posthoc.md and benchmarks/README.md quote, at batch 256
        ratio = folded_multiply_adds(256, in_features, classes, nesting, False, False) / direct_multiply_adds(
            256, in_features, dim, classes, nesting, False, False
        )
        assert round(ratio, 2) == (0.42 if dim == 256 else 0.16)
    h = torch.randn(256, in_features)
    assert fold_pays(h, nn.Linear(in_features, dim), classes, nesting, False) is folds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fold_pays(h, nn.Linear(in_features, dim), classes, nesting, False)
    assert not fold_pays(h.half(), nn.Linear(in_features, dim).half(), classes, nesting, False)


def test_loss_folds_in_training_and_forms_the_embedding_otherwise(monkeypatch):
    """MatryoshkaCrossEntropy.per_size_from_projection: the same losses and gradients folded or not, and
    the folded node is what runs under grad when it pays."""
    import mrl.nn.cross_entropy as cross_entropy

    torch.manual_seed(2)
    h, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    proj = nn.Linear(6, 64).double()
    head = MatryoshkaLinear(64, 4, [2, 8, 64]).double()
    loss = MatryoshkaCrossEntropy(label_smoothing=0.1)
    calls = []
    folded = cross_entropy.folded_matryoshka_cross_entropy
    monkeypatch.setattr(
        cross_entropy, "folded_matryoshka_cross_entropy", lambda *a, **k: calls.append(1) or folded(*a, **k)
    )

    per_size, predictions = loss.per_size_from_projection(head, proj, h, y, predict=True)
    assert predictions.shape == (3, 32)
    grads = torch.autograd.grad(per_size.sum(), [proj.weight, head.weight])
    assert calls == [1]
    expected, _ = loss.per_size_from_embedding(head, proj(h), y)
    torch.testing.assert_close(per_size, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), [proj.weight, head.weight]))
    with torch.no_grad():
        loss.per_size_from_projection(head, proj, h, y)
    assert calls == [1]  # evaluation forms z: no gradient buffer to keep
