"""MatryoshkaLinear against the paper's formulation (a plain loop of nn.Linear per size)."""

import pytest
import torch
import torch.nn.functional as F

from mrl import MatryoshkaLinear

NESTINGS = [[1, 2, 4, 8], [3, 5, 12], [16], [2, 7, 9, 30, 31]]


def reference_logits(z, head: MatryoshkaLinear):
    """The paper's code: MRL loops over separate classifiers; MRL-E slices one weight matrix."""
    out = []
    for g, m in enumerate(head.nesting):
        if head.efficient:
            w, b = head.weight[:, :m], head.bias
        else:
            offset = sum(head.nesting[:g])
            w, b = head.weight[:, offset : offset + m], (None if head.bias is None else head.bias[g])
        logits = z[:, :m] @ w.t()
        out.append(logits if b is None else logits + b)
    return torch.stack(out)


@pytest.mark.parametrize("nesting", NESTINGS)
@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_logits_and_gradients_equal_reference(nesting, efficient, bias, fused):
    torch.manual_seed(0)
    in_features = nesting[-1] + 3
    head = MatryoshkaLinear(in_features, 7, nesting, efficient=efficient, bias=bias, fused=fused).double()
    z = torch.randn(5, in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(len(nesting), 5, 7, dtype=torch.float64)

    logits = head(z)
    assert logits.shape == (len(nesting), 5, 7)
    params = [z, *head.parameters()]
    grads = torch.autograd.grad((logits * grad_out).sum(), params)

    ref = reference_logits(z, head)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), params)
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("efficient", [False, True])
def test_prefix_property(efficient):
    """Logits of size m do not depend on z[:, m:]."""
    torch.manual_seed(1)
    nesting = [2, 4, 8, 16]
    head = MatryoshkaLinear(16, 5, nesting, efficient=efficient)
    z = torch.randn(3, 16, requires_grad=True)
    logits = head(z)
    for g, m in enumerate(nesting):
        (grad,) = torch.autograd.grad(logits[g].sum(), z, retain_graph=True)
        assert torch.all(grad[:, m:] == 0)
        assert torch.any(grad[:, :m] != 0)
        z2 = z.detach().clone()
        z2[:, m:] = torch.randn_like(z2[:, m:])
        torch.testing.assert_close(head(z2)[g], logits[g].detach())


def test_mrl_e_ties_weights_and_mrl_does_not():
    tied = MatryoshkaLinear(8, 3, [2, 4, 8], efficient=True)
    assert tied.weight.shape == (3, 8) and tied.bias.shape == (3,)
    assert tied.size_weight(0).data_ptr() == tied.weight.data_ptr()
    torch.testing.assert_close(tied.size_weight(1), tied.weight[:, :4])
    untied = MatryoshkaLinear(8, 3, [2, 4, 8])
    assert untied.weight.shape == (3, 14) and untied.bias.shape == (3, 3)
    # Changing size 8's classifier leaves size 2's logits unchanged.
    z = torch.randn(4, 8)
    before = untied(z)[0].detach().clone()
    with torch.no_grad():
        untied.size_weight(2).add_(1.0)
    torch.testing.assert_close(untied(z)[0], before)
    tied_before = tied(z)[0].detach().clone()
    with torch.no_grad():
        tied.size_weight(2)[:, :2].add_(1.0)  # size 8's first columns are size 2's classifier
    assert not torch.allclose(tied(z)[0], tied_before)


def test_initialisation_uses_each_size_fan_in():
    head = MatryoshkaLinear(1024, 1000, [4, 1024])
    assert head.size_weight(0).abs().max() <= 0.5 + 1e-6
    assert head.size_weight(0).abs().max() > 0.4
    assert head.size_weight(1).abs().max() <= 1 / 32 + 1e-6


def test_rejects_wrong_input_shape():
    head = MatryoshkaLinear(8, 3, [4, 8])
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        head(torch.randn(2, 6))


def test_matches_plain_linear_with_a_single_size():
    torch.manual_seed(2)
    head = MatryoshkaLinear(6, 4, [6])
    z = torch.randn(3, 6)
    torch.testing.assert_close(head(z)[0], F.linear(z, head.weight, head.bias[0]))


def _random_nesting(rng: torch.Generator) -> list[int]:
    count = int(torch.randint(1, 6, (1,), generator=rng))
    return sorted({int(v) for v in torch.randint(1, 40, (count,), generator=rng)})


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_per_size_on_random_nestings(seed, efficient, bias):
    """Random sizes and nesting lists (mostly not powers of two): fused == per-size, values and grads."""
    rng = torch.Generator().manual_seed(seed)
    nesting = _random_nesting(rng)
    in_features = nesting[-1] + int(torch.randint(0, 4, (1,), generator=rng))
    classes, batch = (int(v) for v in torch.randint(1, 12, (2,), generator=rng))
    torch.manual_seed(seed)
    fused = MatryoshkaLinear(in_features, classes, nesting, efficient=efficient, bias=bias).double()
    ref = MatryoshkaLinear(
        in_features, classes, nesting, efficient=efficient, bias=bias, fused=False
    ).double()
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(batch, in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(len(nesting), batch, classes, dtype=torch.float64)
    out, ref_out = fused(z), ref(z)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((out * grad_out).sum(), [z, *fused.parameters()])
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), [z, *ref.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("efficient", [False, True])
def test_fused_head_under_autocast(efficient):
    """bf16 autocast (GPU training's precision): fused logits and gradients follow the reference."""
    torch.manual_seed(3)
    head = MatryoshkaLinear(24, 5, [3, 8, 24], efficient=efficient)
    z = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(z)
        ref = head.forward_reference(z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    (grad,) = torch.autograd.grad(out.float().sum(), head.weight)
    (ref_grad,) = torch.autograd.grad(ref.float().sum(), head.weight)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref_grad, rtol=0.05, atol=0.05)


def test_fused_head_without_input_gradient():
    """A frozen backbone (z without grad) and a frozen head both work."""
    head = MatryoshkaLinear(8, 3, [2, 8])
    head(torch.randn(4, 8)).sum().backward()
    assert head.weight.grad is not None
    z = torch.randn(4, 8, requires_grad=True)
    head.requires_grad_(False)
    head(z).sum().backward()
    assert z.grad is not None
