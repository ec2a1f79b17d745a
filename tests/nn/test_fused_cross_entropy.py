"""The one-node Matryoshka head + cross-entropy against the paper's per-size loop (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

import mrl.nn.fused_cross_entropy as fused_ce
from mrl import MatryoshkaLinear, MatryoshkaLoss
from mrl.nn.fused import mm_columns
from mrl.nn.fused_cross_entropy import matryoshka_cross_entropy

# Non-powers of two, sizes narrower than MIN_GEMM_WIDTH (windowed matmuls) and a single size.
NESTINGS = [[1, 2, 4, 8], [3, 5, 12, 20], [2, 7, 9, 30, 31], [24], [8, 16, 32]]
CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"ignore_index": 3},
    {"weight": [0.5, 1.0, 2.0, 1.0, 1.5, 1.0, 0.7]},
    {"weight": [0.5, 1.0, 2.0, 1.0, 1.5, 1.0, 0.7], "ignore_index": 0, "label_smoothing": 0.2},
    {"reduction": "sum", "label_smoothing": 0.1},
]


# (log-normaliser read off the target, logits class-major, all sizes' softmax passes at once): the CPU's
# three paths (a small logits buffer, few and many classes) and other devices' (the log-normaliser from
# row maxima, batch-major logits, per size); all four run here.
DEVICE_PATHS = {
    "cpu, small buffer": (True, False, True),
    "cpu, few classes": (True, False, False),
    "cpu, many classes": (True, True, False),
    "other devices": (False, False, False),
}


@pytest.fixture(params=list(DEVICE_PATHS))
def device_path(request, monkeypatch):
    """Every path the fused node takes on some device, forced on the CPU whatever the class count."""
    off_the_target, class_major, at_once = DEVICE_PATHS[request.param]
    monkeypatch.setattr(fused_ce, "_reads_normaliser_off_the_target", lambda device: off_the_target)
    monkeypatch.setattr(fused_ce, "_class_major", lambda device, classes, batch, efficient: class_major)
    monkeypatch.setattr(fused_ce, "_all_sizes_at_once", lambda device, class_major, classes: at_once)
    return request.param


def reference(head: MatryoshkaLinear, z, target, size_weights, **ce):
    """Per-size logits with one F.linear each, then one F.cross_entropy per size."""
    if "weight" in ce:  # stored as MatryoshkaLoss stores it: a float32 buffer, then cast
        ce["weight"] = torch.tensor(ce["weight"], dtype=torch.float32).to(z.dtype)
    logits = head.forward_reference(z)
    per_size = torch.stack([F.cross_entropy(lg, target, **ce) for lg in logits])
    weights = torch.ones(len(per_size), dtype=z.dtype) if size_weights is None else torch.tensor(size_weights)
    return per_size, (weights * per_size).sum(), logits


@pytest.mark.parametrize("nesting", NESTINGS)
@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("options", CE_OPTIONS)
def test_losses_gradients_and_predictions_equal_reference(nesting, efficient, bias, options, device_path):
    torch.manual_seed(len(nesting) + 7 * efficient + 3 * bias)
    in_features = nesting[-1] + 3
    head = MatryoshkaLinear(in_features, 7, nesting, efficient=efficient, bias=bias).double()
    size_weights = torch.rand(len(nesting), dtype=torch.float64).tolist()
    loss_fn = MatryoshkaLoss(size_weights, **options).double()
    z = torch.randn(9, in_features, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (9,))
    target[0] = 3  # ignore_index=3 always has a row to ignore

    per_size, predictions = loss_fn.per_size_from_embedding(head, z, target, predict=True)
    total = loss_fn.combine(per_size)
    params = [z, *head.parameters()]
    grads = torch.autograd.grad(total, params)

    ref_per_size, ref_total, ref_logits = reference(head, z, target, size_weights, **options)
    ref_grads = torch.autograd.grad(ref_total, params)
    torch.testing.assert_close(per_size, ref_per_size, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    assert torch.equal(predictions, ref_logits.argmax(2))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("efficient", [False, True])
def test_random_shapes_and_nestings(seed, efficient, device_path):
    """Random batch, class count, embedding size and nesting list (mostly not powers of two)."""
    rng = torch.Generator().manual_seed(seed)
    in_features = int(torch.randint(17, 80, (1,), generator=rng))
    count = int(torch.randint(1, 6, (1,), generator=rng))
    nesting = sorted({int(v) for v in torch.randint(1, in_features + 1, (count,), generator=rng)})
    batch = int(torch.randint(1, 20, (1,), generator=rng))
    classes = int(torch.randint(2, 40, (1,), generator=rng))
    head = MatryoshkaLinear(in_features, classes, nesting, efficient=efficient).double()
    z = torch.randn(batch, in_features, dtype=torch.float64, generator=rng, requires_grad=True)
    target = torch.randint(0, classes, (batch,), generator=rng)
    loss_fn = MatryoshkaLoss(label_smoothing=0.05).double()
    per_size, _ = loss_fn.per_size_from_embedding(head, z, target)
    ref_per_size, _, _ = reference(head, z, target, None, label_smoothing=0.05)
    params = [z, *head.parameters()]
    grads = torch.autograd.grad(per_size.sum(), params)
    ref_grads = torch.autograd.grad(ref_per_size.sum(), params)
    torch.testing.assert_close(per_size, ref_per_size, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "ignore_index": 2}])
def test_confidently_wrong_rows_keep_a_finite_exact_loss(efficient, bias, options, device_path):
    """float32 logits 1e4 apart: the target's probability underflows to 0, the loss must not be inf."""
    torch.manual_seed(5)
    head = MatryoshkaLinear(16, 5, [4, 16], efficient=efficient, bias=bias)
    z = torch.randn(6, 16) * 1e3
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    per_size, _ = MatryoshkaLoss(**options).per_size_from_embedding(head, z, target)
    logits = head.forward_reference(z)
    target_probs = logits.softmax(2).gather(2, target.view(1, -1, 1).expand(2, -1, -1))
    assert (target_probs < torch.finfo(torch.float32).tiny).any()  # the case this test is about
    ref = torch.stack([F.cross_entropy(lg, target, **options) for lg in logits])
    assert torch.isfinite(per_size).all()
    torch.testing.assert_close(per_size, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("efficient", [False, True])
def test_confidently_wrong_rows_under_bf16_autocast(efficient, device_path):
    """bf16 matmuls, float32 softmax: underflowed rows keep a finite loss close to the float32 one."""
    torch.manual_seed(6)
    head = MatryoshkaLinear(16, 5, [4, 16], efficient=efficient)
    z, target = torch.randn(6, 16) * 1e3, torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_size, _ = MatryoshkaLoss().per_size_from_embedding(head, z, target)
    ref = torch.stack([F.cross_entropy(lg, target) for lg in head.forward_reference(z)])
    assert ref.min() > 87  # the target probabilities underflow in float32
    assert torch.isfinite(per_size).all()
    torch.testing.assert_close(per_size, ref, rtol=0.02, atol=0.0)


def test_two_graphs_alive_at_once_do_not_share_a_buffer(device_path):
    """The reused CPU buffer is taken per forward and given back after backward."""
    torch.manual_seed(0)
    head = MatryoshkaLinear(20, 6, [4, 20], efficient=True).double()
    z1, z2 = (torch.randn(5, 20, dtype=torch.float64, requires_grad=True) for _ in range(2))
    target = torch.randint(0, 6, (5,))
    loss_fn = MatryoshkaLoss().double()
    a = loss_fn.combine(loss_fn.per_size_from_embedding(head, z1, target)[0])
    b = loss_fn.combine(loss_fn.per_size_from_embedding(head, z2, target)[0])
    g1, g2 = torch.autograd.grad(a + 2 * b, [z1, z2])
    r1 = torch.autograd.grad(reference(head, z1, target, None)[1], z1)[0]
    r2 = torch.autograd.grad(reference(head, z2, target, None)[1], z2)[0]
    torch.testing.assert_close(g1, r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, 2 * r2, rtol=1e-12, atol=1e-12)


def test_without_gradients_and_with_frozen_parts():
    head = MatryoshkaLinear(20, 4, [2, 20])
    z, target = torch.randn(3, 20), torch.tensor([0, 1, 3])
    loss_fn = MatryoshkaLoss()
    with torch.no_grad():
        frozen, _ = loss_fn.per_size_from_embedding(head, z, target)
    ref, _, _ = reference(head, z, target, None)
    torch.testing.assert_close(frozen, ref.detach())
    loss_fn.per_size_from_embedding(head, z, target)[0].sum().backward()  # z without grad
    assert head.weight.grad is not None
    head.requires_grad_(False)
    z.requires_grad_(True)
    loss_fn.per_size_from_embedding(head, z, target)[0].sum().backward()  # frozen head
    assert z.grad is not None


def test_second_backward_through_the_reused_buffer_is_refused():
    head = MatryoshkaLinear(20, 4, [2, 20])
    per_size, _ = MatryoshkaLoss().per_size_from_embedding(head, torch.randn(3, 20), torch.tensor([0, 1, 3]))
    per_size.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused=False"):
        per_size.sum().backward()


def test_unfused_head_or_loss_falls_back_to_head_then_loss():
    torch.manual_seed(1)
    z, target = torch.randn(4, 20, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    head = MatryoshkaLinear(20, 3, [5, 20], fused=False).double()
    per_size, predictions = MatryoshkaLoss().per_size_from_embedding(head, z, target, predict=True)
    ref, _, logits = reference(head, z, target, None)
    torch.testing.assert_close(per_size, ref)
    assert torch.equal(predictions, logits.argmax(2))


@pytest.mark.parametrize("efficient", [False, True])
def test_under_bf16_autocast(efficient, device_path):
    """GPU training's precision: bf16 matmuls, float32 softmax; close to the float32 reference."""
    torch.manual_seed(3)
    head = MatryoshkaLinear(24, 5, [3, 8, 24], efficient=efficient)
    z, target = torch.randn(6, 24, requires_grad=True), torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_size, _ = MatryoshkaLoss().per_size_from_embedding(head, z, target)
    assert per_size.dtype == torch.float32
    ref, _, _ = reference(head, z, target, None)
    torch.testing.assert_close(per_size, ref, rtol=0.05, atol=0.05)
    (grad,) = torch.autograd.grad(per_size.sum(), head.weight)
    (ref_grad,) = torch.autograd.grad(ref.sum(), head.weight)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref_grad, rtol=0.05, atol=0.05)


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        matryoshka_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), None, torch.tensor([0, 1]), [4], True,
                                 reduction="none")  # fmt: skip


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 8), (3, 11), (40, 48), (44, 48), (0, 16), (8, 40)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_columns_equals_a_plain_product(start, stop, accumulate):
    """Narrow products go through a MIN_GEMM_WIDTH-column window, also at the matrix's right edge."""
    torch.manual_seed(start)
    a, m = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 48, dtype=torch.float64)
    out = torch.randn(5, stop - start, dtype=torch.float64)
    want = a @ m[:, start:stop] + (out if accumulate else 0)
    mm_columns(a, m, start, stop, out, accumulate=accumulate)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_untied_mrl_goes_class_major_at_fewer_classes_per_row_than_mrl_e():
    batch = 6
    untied_switch = math.ceil(fused_ce.CLASS_MAJOR_MIN_CLASSES_PER_ROW_UNTIED * batch)
    cpu = torch.device("cpu")
    assert fused_ce._class_major(cpu, untied_switch, batch, efficient=False)
    assert not fused_ce._class_major(cpu, untied_switch, batch, efficient=True)


def test_only_few_classes_in_batch_major_cpu_logits_run_the_softmax_passes_for_all_sizes_at_once():
    cpu, most = torch.device("cpu"), fused_ce.ALL_SIZES_AT_ONCE_MAX_CLASSES
    assert fused_ce._all_sizes_at_once(cpu, class_major=False, classes=most)
    assert not fused_ce._all_sizes_at_once(cpu, class_major=False, classes=most + 1)
    assert not fused_ce._all_sizes_at_once(cpu, class_major=True, classes=2)
    assert not fused_ce._all_sizes_at_once(torch.device("cuda"), class_major=False, classes=2)


@pytest.mark.parametrize("efficient", [False, True], ids=["MRL", "MRL-E"])
def test_many_classes_take_the_class_major_path_on_the_cpu(efficient):
    """The default rule, unpatched: from its head's threshold of classes per row of the batch on, the
    CPU's buffer is (C, B) in memory, and the losses and gradients still equal the reference."""
    per_row = (
        fused_ce.CLASS_MAJOR_MIN_CLASSES_PER_ROW
        if efficient
        else fused_ce.CLASS_MAJOR_MIN_CLASSES_PER_ROW_UNTIED
    )
    batch = 6
    classes = math.ceil(per_row * batch)
    cpu = torch.device("cpu")
    assert fused_ce._class_major(cpu, classes, batch, efficient)
    assert not fused_ce._class_major(cpu, classes - 1, batch, efficient)
    assert not fused_ce._class_major(torch.device("cuda"), 10 * classes, batch, efficient)
    torch.manual_seed(2)
    head = MatryoshkaLinear(12, classes, [3, 12], efficient=efficient).double()
    z = torch.randn(batch, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (batch,))
    fused_ce._IDLE_BUFFERS.clear()
    per_size, _ = MatryoshkaLoss().per_size_from_embedding(head, z, target)
    grads = torch.autograd.grad(per_size.sum(), [z, head.weight])
    (buffer,) = fused_ce._IDLE_BUFFERS.values()  # handed back after backward
    assert buffer.shape == (2, batch, classes) and buffer.stride()[1:] == (1, batch)
    ref, _, _ = reference(head, z, target, None)
    ref_grads = torch.autograd.grad(ref.sum(), [z, head.weight])
    torch.testing.assert_close(per_size, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,in_place", [(torch.float64, False), (torch.float64, True), (torch.bfloat16, False)]
)
def test_shifted_exponentials_of_a_class_major_buffer_give_torch_softmax(dtype, in_place):
    """The class-major softmax, left unnormalised: out / row_sum is the softmax and row_max + log(row_sum)
    the logsumexp; bf16 logits (autocast) get a float32 softmax, as torch's dtype= gives."""
    logits = (torch.randn(6, 40, dtype=torch.float64) * 30).to(dtype)  # large: needs the max shift
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(40, 6, dtype=out_dtype).t()
    if in_place:
        out.copy_(logits)
        logits = out
    want_probs = torch.softmax(logits, 1, dtype=out_dtype)
    want_lse = torch.logsumexp(logits.to(out_dtype), 1)
    row_max, row_sum = torch.empty(6, dtype=out_dtype), torch.empty(6, dtype=out_dtype)
    fused_ce._shifted_exp_into(logits, out, row_max, row_sum)
    assert out.stride() == (1, 6)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(out / row_sum.unsqueeze(1), want_probs, **tol)
    torch.testing.assert_close(row_max + row_sum.log(), want_lse, **tol)
