"""Matryoshka-Adaptor (mrl.nn.adaptor): the identity at the start, and each loss against a loop over
pairs and triples written out here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mrl.errors import MRLError
from mrl.nn.adaptor import MatryoshkaAdaptor


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def make(**kwargs) -> MatryoshkaAdaptor:
    torch.manual_seed(0)
    adaptor = MatryoshkaAdaptor(
        **{"in_features": 6, "nesting": [2, 4, 6], "neighbours": 2, **kwargs}
    ).double()
    with torch.no_grad():  # away from the identity, so that the losses are not all zero
        adaptor.residual[-1].weight.normal_(std=0.5)
        adaptor.residual[-1].bias.normal_(std=0.1)
    return adaptor


def reference_terms(x: torch.Tensor, a: torch.Tensor, m: int, neighbours: int, labels=None) -> dict:
    n = len(x)
    pair = [abs(cos(x[i], x[j]) - cos(a[i, :m], a[j, :m])) for i in range(n) for j in range(n) if i != j]
    topk = []
    for i in range(n):
        nearest = sorted((j for j in range(n) if j != i), key=lambda j: -cos(x[i], x[j]))[:neighbours]
        topk += [abs(cos(x[i], x[j]) - cos(a[i, :m], a[j, :m])) for j in nearest]
    terms = {"pair": sum(pair) / len(pair), "topk": sum(topk) / len(topk), "rec": float((x - a).abs().mean())}
    if labels is not None:
        ranked = []
        for i, j, k in itertools.product(range(n), repeat=3):
            y_ij, y_ik = float(labels[i] == labels[j]), float(labels[i] == labels[k])
            if i not in (j, k) and y_ij > y_ik:
                s_ij, s_ik = cos(a[i, :m], a[j, :m]), cos(a[i, :m], a[k, :m])
                ranked.append((y_ij - y_ik) * math.log1p(math.exp(s_ik - s_ij)))
        terms["rank"] = sum(ranked) / len(ranked)
    return terms


def test_the_adaptor_starts_as_the_identity():
    torch.manual_seed(3)
    adaptor = MatryoshkaAdaptor(8, [2, 8])
    x = torch.randn(5, 8)
    assert torch.equal(adaptor(x), x)
    assert torch.equal(adaptor.embed(x, 2), x[:, :2])
    # the prefixes of the original still differ from the full embedding: only the full size's loss is 0
    losses = adaptor.per_size(x)
    assert losses[-1] < 1e-6 and losses[0] > 0.1


@pytest.mark.parametrize("supervised", [False, True])
def test_per_size_losses_match_the_loops(supervised):
    weights = {"topk_weight": 0.7, "pair_weight": 1.3, "reconstruction_weight": 0.4, "ranking_weight": 2.0}
    adaptor = make(supervised=supervised, **weights)
    x = torch.randn(7, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1])
    with torch.no_grad():
        a = adaptor(x)
    got = adaptor.per_size(x, labels if supervised else None)
    want = []
    for m in adaptor.nesting:
        t = reference_terms(x, a, m, 2, labels if supervised else None)
        loss = 0.7 * t["topk"] + 1.3 * t["pair"] + 0.4 * t["rec"] / 3
        want.append(loss + 2.0 * t["rank"] if supervised else loss)
    # float64 throughout: a weight rounded to float32 on the way (1e-8) fails this
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_each_term_alone_matches_its_loop():
    x = torch.randn(6, 6, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 0, 2, 1])
    only = {"topk_weight": 0.0, "pair_weight": 0.0, "reconstruction_weight": 0.0, "ranking_weight": 0.0}
    for term, setting in [("topk", "topk_weight"), ("pair", "pair_weight"), ("rank", "ranking_weight")]:
        adaptor = make(supervised=True, **{**only, setting: 1.0})
        with torch.no_grad():
            a = adaptor(x)
        want = [reference_terms(x, a, m, 2, labels)[term] for m in adaptor.nesting]
        got = adaptor.per_size(x, labels)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_few_steps_lower_the_loss_of_the_small_sizes():
    torch.manual_seed(4)
    x = torch.randn(64, 16) @ torch.randn(16, 16)  # correlated features: the small prefixes lose structure
    adaptor = MatryoshkaAdaptor(16, [2, 4, 16], neighbours=5)
    optimizer = torch.optim.Adam(adaptor.parameters(), lr=1e-2)
    before = adaptor.per_size(x).detach()
    for _ in range(50):
        optimizer.zero_grad()
        adaptor.per_size(x).sum().backward()
        optimizer.step()
    after = adaptor.per_size(x).detach()
    assert after[0] < 0.95 * before[0] and after[1] < 0.95 * before[1]


def test_neighbours_beyond_the_batch_use_every_other_row():
    x = torch.randn(3, 6, dtype=torch.float64)
    adaptor = make(neighbours=10, pair_weight=0.0, reconstruction_weight=0.0)
    with torch.no_grad():
        a = adaptor(x)
    want = [reference_terms(x, a, m, 2)["topk"] for m in adaptor.nesting]
    torch.testing.assert_close(adaptor.per_size(x), torch.tensor(want, dtype=torch.float64))


def test_bad_settings_and_missing_labels_are_refused():
    with pytest.raises(MRLError, match="sizes go up to 8 but the frozen embedding has 6"):
        MatryoshkaAdaptor(6, [2, 8])
    with pytest.raises(MRLError, match="at least 1"):
        MatryoshkaAdaptor(6, [2, 6], neighbours=0)
    with pytest.raises(ValueError, match="labels"):
        make(supervised=True).per_size(torch.randn(4, 6, dtype=torch.float64))
