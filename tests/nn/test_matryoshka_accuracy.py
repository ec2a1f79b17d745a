"""MatryoshkaAccuracy against one torchmetrics MulticlassAccuracy per size (the formulation it replaces)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy


def batches(sizes: int, classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits ``(G, B, C)`` and targets of varied batch sizes; small integer logits, so ties are common
    (top-1 must pick the first of tied classes, as torchmetrics does)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in (7, 1, 16):
        logits = torch.randint(0, 4, (sizes, batch, classes), generator=gen).float()
        out.append((logits, torch.randint(0, classes, (batch,), generator=gen)))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize(("sizes", "classes"), [(1, 5), (4, 10), (9, 7)])
def test_equals_one_multiclass_accuracy_per_size(top_k: int, sizes: int, classes: int) -> None:
    ours = MatryoshkaAccuracy(sizes, top_k=top_k)
    reference = [MulticlassAccuracy(classes, top_k=top_k, average="micro") for _ in range(sizes)]
    for logits, target in batches(sizes, classes, seed=top_k * 100 + sizes):
        ours.update(logits, target)
        for g, metric in enumerate(reference):
            metric.update(logits[g], target)
    expected = torch.stack([metric.compute() for metric in reference])
    torch.testing.assert_close(ours.compute().reshape(-1), expected)


def test_predicted_classes_count_as_their_logits_argmax() -> None:
    from_logits, from_classes = MatryoshkaAccuracy(3), MatryoshkaAccuracy(3)
    for logits, target in batches(3, 6, seed=0):
        from_logits.update(logits, target)
        from_classes.update(logits.argmax(-1), target)
    torch.testing.assert_close(from_classes.compute(), from_logits.compute())
    assert from_logits.compute().shape == (3,)


def test_reset_and_empty_epoch_give_zero_and_bad_use_is_refused() -> None:
    metric = MatryoshkaAccuracy(2)
    metric.update(torch.tensor([[1, 2], [1, 1]]), torch.tensor([1, 1]))
    torch.testing.assert_close(metric.compute(), torch.tensor([0.5, 1.0]))
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        torch.testing.assert_close(metric.compute(), torch.zeros(2))
    with pytest.raises(ValueError, match="needs logits"):
        MatryoshkaAccuracy(2, top_k=5).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="num_sizes >= 1"):
        MatryoshkaAccuracy(0)
