"""CSR's top-k sparse autoencoder (mrl.nn.sparse_autoencoder) against references written out here the way
CSR's training script computes them: one top-k call per code, masks by multiplication, two copies of the
batch for the contrastive term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrl.errors import MRLError
from mrl.nn import sparse_autoencoder
from mrl.nn.sparse_autoencoder import (
    SparseAutoencoder,
    annealed_k,
    code_contrastive_loss,
    normalized_mse,
    top_k_code,
)


def reference_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Row by row: keep the k largest pre-activations, ReLU them, zero the rest (as CSR's masks by
    multiplication: differentiable in the kept pre-activations)."""
    kept = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda u: -float(pre[row, u]))
        for unit in order[:k]:
            kept[row, unit] = 1.0
    return F.relu(pre) * kept


def reference_contrastive(
    codes: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """CSR's inbatch_cl / CSRv2's label_based_cl: 2B rows (two copies), exp-similarity sums."""
    z = F.normalize(torch.cat([codes, codes]), dim=1)
    keys = torch.arange(codes.shape[0]).repeat(2) if labels is None else labels.repeat(2)
    sim = torch.exp(z @ z.T / temperature)
    positive = (keys[:, None] == keys[None, :]).float() - torch.eye(len(keys))
    negative = (keys[:, None] != keys[None, :]).float()
    pos, neg = (sim * positive).sum(1), (sim * negative).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


def reference_loss(sae: SparseAutoencoder, x: torch.Tensor, k: int, dead: torch.Tensor, labels=None):
    """CSR's loss for one k: L(k) + 1/8 L(4k) + aux_weight * L_aux (+ contrastive), term by term."""
    w, b_pre, b_lat = sae.encoder.weight, sae.pre_bias, sae.latent_bias
    pre = (x - b_pre) @ w.T + b_lat
    decode = lambda z: z @ w + b_pre  # noqa: E731 - the tied decoder, as written in CSR
    recon_k = decode(reference_code(pre, k))
    recon_4k = decode(reference_code(pre, min(4 * k, sae.hidden)))
    recon_aux = decode(reference_code(pre * dead, min(sae.aux_k, sae.hidden)))
    target = x - recon_k.detach() + b_pre.detach()
    mse = torch.nn.MSELoss()
    aux = mse(recon_aux, target) / mse(target.mean(0)[None, :].broadcast_to(target.shape), target)
    loss = mse(x, recon_k) + sae.wide_weight * mse(x, recon_4k) + sae.aux_weight * aux
    if sae.contrastive != "none":
        cl_labels = labels if sae.contrastive == "label" else None
        loss = loss + sae.contrastive_weight * reference_contrastive(
            reference_code(pre, k), cl_labels, sae.temperature
        )
    return loss


def make(**kwargs) -> SparseAutoencoder:
    torch.manual_seed(0)
    settings = {"in_features": 6, "sizes": [2, 4], "expansion": 3, "aux_k": 5, "dead_steps": 2}
    sae = SparseAutoencoder(**{**settings, **kwargs}).double()
    with torch.no_grad():  # trained-looking biases, so that a term that drops one shows
        sae.pre_bias.normal_()
        sae.latent_bias.normal_(std=0.1)
    return sae


def test_top_k_code_keeps_the_k_largest_relud():
    torch.manual_seed(1)
    pre = torch.randn(5, 12, dtype=torch.float64)
    for k in (1, 3, 12):
        code = top_k_code(pre, k)
        assert torch.equal(code, reference_code(pre, k))
        assert ((code != 0).sum(1) <= k).all()


def test_encode_gives_at_most_k_non_zeros_of_the_hidden_width():
    sae = make()
    x = torch.randn(7, 6, dtype=torch.float64)
    code = sae.encode(x, 3)
    assert code.shape == (7, 18)
    assert ((code != 0).sum(1) <= 3).all() and (code >= 0).all()
    assert torch.equal(sae(x), sae.encode(x, 4))


@pytest.mark.parametrize("contrastive", ["none", "instance", "label"])
def test_per_size_loss_is_csr_loss_at_each_k(contrastive):
    sae = make(contrastive=contrastive).eval()  # eval: no dead-unit count moves
    with torch.no_grad():
        sae.steps_since_active[::3] = sae.dead_steps  # every third unit dead
    dead = (torch.arange(sae.hidden) % 3 == 0).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    got = sae.per_size(x, labels)
    want = torch.stack([reference_loss(sae, x, k, dead, labels) for k in sae.sizes])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sparse_decodes", [True, False, None])
@pytest.mark.parametrize("sizes", [[2, 4], [1, 3, 5]])
def test_losses_and_gradients_of_both_decodes_are_the_references(sizes, sparse_decodes):
    # sums of decoder rows (nested prefixes cumulatively, the wide and aux-k codes as bags), products
    # of the dense codes, or the CPU's mix of both (None: these narrow nested codes summed, the wide and
    # aux-k codes multiplied); the reference decodes each dense code with a product
    sae = make(sizes=sizes, contrastive="label").eval()
    sae.sparse_decodes = sparse_decodes
    with torch.no_grad():
        sae.steps_since_active[::2] = sae.dead_steps
    dead = (torch.arange(sae.hidden) % 2 == 0).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    weights = torch.linspace(0.5, 2.0, len(sizes), dtype=torch.float64)
    grads = []
    got = sae.per_size(x, labels)
    torch.testing.assert_close(got, torch.stack([reference_loss(sae, x, k, dead, labels) for k in sizes]))
    for loss in (
        (got * weights).sum(),
        (torch.stack([reference_loss(sae, x, k, dead, labels) for k in sizes]) * weights).sum(),
    ):
        sae.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in (sae.encoder.weight, sae.pre_bias, sae.latent_bias)])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_narrow_codes_are_decoded_as_row_sums_on_the_cpu_only_unless_told(monkeypatch):
    bags = []
    real = F.embedding_bag
    monkeypatch.setattr(
        F, "embedding_bag", lambda units, *a, **k: bags.append(units.numel()) or real(units, *a, **k)
    )
    sae = make(sizes=[2, 4]).train()  # 18 units: nested codes of 2 and 4, wide codes of 8 and 16
    x = torch.randn(4, 6, dtype=torch.float64)
    sae.per_size(x)
    # the default on the CPU: the nested codes in one bag call (4 rows each: 4 x cost <= 2 products of
    # 18 units), the wide and aux-k codes (5 rows and more: 5 x cost > 18) as products
    assert bags == [4 * 4]
    cost, hidden = sparse_autoencoder.SUM_ROW_COST, sae.hidden
    assert sae._sums(x, units=hidden // cost) and not sae._sums(x, units=hidden // cost + 1)
    assert sae._sums(x, units=2 * hidden // cost, decodes=2)
    assert not sae._sums(torch.zeros(1, device="meta"), units=1)  # any other device: dense products
    bags.clear()
    sae.sparse_decodes = False
    sae.per_size(x)
    assert not bags
    sae.sparse_decodes = True
    sae.per_size(x)
    assert len(bags) == 4  # nested codes, two wide codes, the aux-k code
    assert sae._sums(torch.zeros(1, device="meta"), units=10**6)


def test_the_wide_code_is_capped_at_the_hidden_width():
    sae = make(sizes=[8, 18], aux_weight=0.0).eval()  # 4k > 18 units: every unit
    x = torch.randn(4, 6, dtype=torch.float64)
    dead = torch.zeros(sae.hidden, dtype=torch.float64)
    want = torch.stack([reference_loss(sae, x, k, dead) for k in sae.sizes])
    torch.testing.assert_close(sae.per_size(x), want)


def test_contrastive_terms_match_csr_two_copy_forms():
    torch.manual_seed(2)
    codes = torch.relu(torch.randn(8, 10, dtype=torch.float64))
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    for lab in (None, labels):
        torch.testing.assert_close(
            code_contrastive_loss(codes, lab, 0.2), reference_contrastive(codes, lab, 0.2)
        )


def test_normalized_mse_is_relative_to_the_batch_mean_and_zero_without_spread():
    target = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    recon = torch.tensor([[1.5, 2.0], [3.0, 5.0]])
    mean_err = ((target - target.mean(0)) ** 2).mean()
    torch.testing.assert_close(normalized_mse(recon, target), ((recon - target) ** 2).mean() / mean_err)
    assert normalized_mse(recon[:1], target[:1]) == 0  # one row: nothing to explain


def test_dead_units_are_counted_in_steps_without_activity():
    sae = make(sizes=[1], expansion=2, dead_steps=3).train()  # widest code: 4 of 12 units per row
    x = torch.randn(3, 6, dtype=torch.float64)
    since = np.zeros(sae.hidden, dtype=int)
    for _ in range(5):
        with torch.no_grad():
            pre = sae.pre_activations(x)
        active = set()
        for row in range(3):
            order = np.argsort(-pre[row].numpy(), kind="stable")[:4]
            active |= {int(u) for u in order if pre[row, u] > 0}
        since = np.array([0 if u in active else s + 1 for u, s in enumerate(since)])
        sae.per_size(x)
        assert sae.steps_since_active.tolist() == since.tolist()
        assert float(sae.dead_fraction()) == pytest.approx(np.mean(since >= 3))
    assert 0 < float(sae.dead_fraction()) < 1  # the same batch leaves most units dead, not all


def test_eval_mode_leaves_the_counts_alone():
    sae = make().eval()
    sae.per_size(torch.randn(4, 6, dtype=torch.float64))
    assert int(sae.steps_since_active.sum()) == 0


def test_aux_k_gradient_reaches_dead_units_only_through_the_aux_term():
    x = torch.randn(6, 6, dtype=torch.float64)
    grads = {}
    for weight in (0.0, 1.0):
        sae = make(sizes=[1], expansion=4, aux_weight=weight, aux_k=24).eval()
        with torch.no_grad():
            used = (sae.encode(x, 4) != 0).any(0)  # the units of the widest code of k=1
            revivable = (sae.pre_activations(x) > 0).any(0) & ~used
            sae.steps_since_active[~used] = sae.dead_steps
        sae.per_size(x).sum().backward()
        grads[weight] = sae.encoder.weight.grad.abs().sum(1)
    assert revivable.any()
    assert torch.all(grads[0.0][~used] == 0)  # no code uses a dead unit: no gradient without aux-k
    # aux-k (every unit may take part here) reaches each dead unit with a positive pre-activation
    assert torch.all(grads[1.0][revivable] > 0)
    assert torch.all(grads[1.0][~used & ~revivable] == 0)


def test_k_annealing_follows_csrv2_linear_schedule():
    def csrv2(step, initial, final, total_steps):  # CSRv2's get_current_k with its ratio folded in
        if step >= total_steps:
            return final
        progress = step / total_steps
        return round(initial * (1 - progress) + final * progress)

    for step in range(0, 14):
        assert annealed_k(step, 40, 8, 10) == csrv2(step, 40, 8, 10)
    sae = make(sizes=[2, 4], k_start=12, k_anneal_steps=4)
    assert sae.trained_sizes(0) == [12, 12]
    assert sae.trained_sizes(2) == [7, 8]
    assert sae.trained_sizes(4) == sae.trained_sizes(None) == [2, 4]


def test_annealed_step_trains_wider_codes():
    sae = make(sizes=[2], k_start=8, k_anneal_steps=10, aux_weight=0.0).train()
    x = torch.randn(5, 6, dtype=torch.float64)
    dead = torch.zeros(sae.hidden, dtype=torch.float64)
    torch.testing.assert_close(sae.per_size(x, step=0), reference_loss(sae, x, 8, dead)[None])
    torch.testing.assert_close(sae.per_size(x, step=10), reference_loss(sae, x, 2, dead)[None])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sizes": [4, 40]}, "hidden layer has only 18 units"),
        ({"sizes": [0, 4]}, "must be at least 1"),
        ({"expansion": 0.5}, "expansion must be at least 1"),
        ({"k_start": 2}, "k-annealing starts from k_start=2"),
        ({"k_start": 8, "k_anneal_steps": 0}, "k_anneal_steps >= 1"),
        ({"contrastive": "views"}, "contrastive term must be one of"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(MRLError, match=message):
        make(**settings)


@pytest.mark.parametrize("k", [0, 19])
def test_encode_refuses_k_outside_the_hidden_width(k):
    with pytest.raises(MRLError, match="between 1 and 18"):
        make().encode(torch.randn(2, 6, dtype=torch.float64), k)


def test_label_contrastive_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        make(contrastive="label").per_size(torch.randn(3, 6, dtype=torch.float64))
