"""The per-size loss mean (one torchmetrics Metric) against a plain running mean, its DDP reduction, and
the bundle of a head's per-size metrics by logged key."""

from __future__ import annotations

import pytest
import torch

from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy
from mrl.nn.per_size_metrics import MatryoshkaLossMean, PerSizeMetrics
from support import in_gloo_processes

NESTING = [2, 4, 8]


def batches(seed: int, sizes=(7, 1, 16, 5)) -> list[tuple[torch.Tensor, int]]:
    """Per-size mean losses of batches of varied sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(len(NESTING), generator=gen) * 3, b) for b in sizes]


def plain_mean(seen: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The epoch's mean of every size, written out: sum of loss * batch size over the examples' count."""
    total = torch.zeros(len(NESTING))
    for per_size, batch in seen:
        total = total + per_size * batch
    return total / sum(batch for _, batch in seen)


def test_the_mean_is_the_example_weighted_mean_of_the_batches():
    metric = MatryoshkaLossMean(len(NESTING))
    seen = batches(0)
    for per_size, batch in seen:
        metric.update(per_size, batch)
    assert torch.equal(metric.compute(), plain_mean(seen))  # the same arithmetic, bit for bit
    metric.reset()
    metric.update(*seen[0])
    assert torch.equal(metric.compute(), seen[0][0] * seen[0][1] / seen[0][1])


def test_ddp_reduces_sums_and_counts_to_the_exact_global_mean():
    """Two processes' states merged by the metric's own reduction (what torchmetrics does across ranks):
    the mean over every example, not the mean of the two processes' means."""
    first, second = batches(1, sizes=(32, 32, 3)), batches(2, sizes=(5,))
    ranks = [MatryoshkaLossMean(len(NESTING)), MatryoshkaLossMean(len(NESTING))]
    for metric, seen in zip(ranks, (first, second), strict=True):
        for per_size, batch in seen:
            metric.update(per_size, batch)
    ranks[0].merge_state(ranks[1])
    merged = ranks[0].compute()
    torch.testing.assert_close(merged, plain_mean(first + second))
    means_mean = (plain_mean(first) + plain_mean(second)) / 2
    assert not torch.allclose(merged, means_mean)  # what averaging the processes' means would give


def test_the_loss_mean_takes_no_gradient_and_no_graph():
    per_size = torch.rand(len(NESTING), requires_grad=True)
    metric = MatryoshkaLossMean(len(NESTING))
    metric.update(per_size * 2, 4)
    assert not metric.sum.requires_grad


def test_a_heads_metrics_by_logged_key():
    metrics = PerSizeMetrics(NESTING, top_k=(1, 2))
    gen = torch.Generator().manual_seed(3)
    accuracy = {1: MatryoshkaAccuracy(len(NESTING), 1), 2: MatryoshkaAccuracy(len(NESTING), 2)}
    seen = []
    for per_size, batch in batches(4):
        logits = torch.randn(len(NESTING), batch, 5, generator=gen)
        target = torch.randint(0, 5, (batch,), generator=gen)
        metrics.update(per_size, target, logits)
        for metric in accuracy.values():
            metric.update(logits, target)
        seen.append((per_size, batch))
    values = metrics.compute("val/depth1")
    mean, top1, top2 = plain_mean(seen), accuracy[1].compute(), accuracy[2].compute()
    assert set(values) == {f"val/depth1/{name}@{d}" for name in ("acc", "top2", "loss") for d in NESTING}
    for g, d in enumerate(NESTING):
        assert values[f"val/depth1/loss@{d}"] == mean[g]
        assert values[f"val/depth1/acc@{d}"] == top1[g]
        assert values[f"val/depth1/top2@{d}"] == top2[g]
    # computing resets: an epoch without batches has accuracies of 0 (as torchmetrics' own) and no loss
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metrics.compute("val/depth1")
    assert set(empty) == {f"val/depth1/{name}@{d}" for name in ("acc", "top2") for d in NESTING}
    assert all(v == 0 for v in empty.values())


def test_a_loss_only_bundle_and_a_one_size_head():
    contrastive = PerSizeMetrics(NESTING, top_k=(), loss_name="contrastive_loss")
    contrastive.update(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(4, dtype=torch.long))
    assert contrastive.compute("train") == {
        "train/contrastive_loss@2": 1.0,
        "train/contrastive_loss@4": 2.0,
        "train/contrastive_loss@8": 3.0,
    }
    one = PerSizeMetrics([16])
    one.update(torch.tensor([0.5]), torch.tensor([1, 0]), torch.tensor([[1, 1]]))
    assert one.compute("test") == {"test/acc@16": 0.5, "test/loss@16": 0.5}


def _rank_mean(rank: int, seen: list):
    metric = MatryoshkaLossMean(len(NESTING))
    for per_size, batch in seen[rank]:
        metric.update(per_size, batch)
    return metric.compute()  # torchmetrics gathers and sums the two processes' states


@pytest.mark.slow
def test_two_gloo_processes_log_the_global_mean():
    seen = [batches(5, sizes=(32, 32, 3)), batches(6, sizes=(5,))]
    results = in_gloo_processes(_rank_mean, seen)
    expected = plain_mean(seen[0] + seen[1])
    for rank in range(2):
        torch.testing.assert_close(results[rank], expected)


def test_training_batches_are_queued_and_counted_as_if_updated_one_by_one(monkeypatch):
    """Batches given as top-1 classes reach the states every PENDING_BATCHES batches and before compute:
    the epoch's values are a plain running mean and hit count of every batch, partial batches included."""
    monkeypatch.setattr(PerSizeMetrics, "PENDING_BATCHES", 4)
    metrics = PerSizeMetrics(NESTING)
    gen = torch.Generator().manual_seed(7)
    seen, hits, examples = [], torch.zeros(len(NESTING)), 0
    for per_size, batch in batches(8, sizes=(6, 6, 6, 6, 6, 6, 3)):
        target = torch.randint(0, 4, (batch,), generator=gen)
        classes = torch.randint(0, 4, (len(NESTING), batch), generator=gen)
        metrics.update(per_size.requires_grad_(), target, classes)
        seen.append((per_size.detach(), batch))
        hits += (classes == target).sum(1)
        examples += batch
        # at most PENDING_BATCHES - 1 batches wait; the 4th batch flushed the first four
        assert len(metrics._pending) == len(seen) % 4
        assert int(metrics.loss.count) == 6 * 4 * (len(seen) // 4)
    assert not any(p.requires_grad for p, _, _ in metrics._pending)  # no graph is kept alive
    values = metrics.compute("train")
    for g, d in enumerate(NESTING):
        torch.testing.assert_close(values[f"train/loss@{d}"], plain_mean(seen)[g])
        assert values[f"train/acc@{d}"] == hits[g] / examples
    assert metrics._pending == [] and int(metrics.loss.count) == 0  # computed, then reset


def test_logits_are_counted_at_once_and_scores_are_required_for_accuracies():
    metrics = PerSizeMetrics(NESTING, top_k=(1, 2))
    metrics.update(torch.rand(len(NESTING)), torch.tensor([0, 1]), torch.randn(len(NESTING), 2, 3))
    assert metrics._pending == [] and int(metrics.accuracies["acc"].total) == 2
    with pytest.raises(ValueError, match="needs scores"):
        metrics.update(torch.rand(len(NESTING)), torch.tensor([0, 1]))


def test_the_loss_mean_of_several_batches_at_once_equals_their_running_mean():
    seen = batches(9, sizes=(8, 8, 8, 2))
    for group in (seen[:3], seen):  # equal counts (one sum), then a partial batch among them
        metric = MatryoshkaLossMean(len(NESTING))
        metric.update(torch.stack([p for p, _ in group]), [b for _, b in group])
        torch.testing.assert_close(metric.compute(), plain_mean(group))
