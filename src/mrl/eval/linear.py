"""Linear classification per size with the trained Matryoshka heads, on exported embeddings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mrl.nn.matryoshka_linear import MatryoshkaLinear


def head_probabilities(
    head: MatryoshkaLinear, embeddings: np.ndarray, chunk: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Softmax probabilities ``(G, chunk, C)`` of every trained size, ``chunk`` rows at a time."""
    head = head.float().eval()
    with torch.inference_mode():
        for start in range(0, len(embeddings), chunk):
            z = torch.from_numpy(np.array(embeddings[start : start + chunk], dtype=np.float32))
            yield slice(start, start + len(z)), head(z).softmax(-1)


def max_softmax_predictions(
    head: MatryoshkaLinear, embeddings: np.ndarray, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per size: the predicted class and its max softmax probability, each ``(G, N)`` (for the cascade)."""
    g, n = len(head.nesting), len(embeddings)
    pred = np.empty((g, n), dtype=np.int64)
    conf = np.empty((g, n), dtype=np.float32)
    for rows, probs in head_probabilities(head, embeddings, chunk):
        c, p = probs.max(-1)
        pred[:, rows], conf[:, rows] = p.numpy(), c.numpy()
    return pred, conf


def linear_accuracy(
    head: MatryoshkaLinear,
    embeddings: np.ndarray,
    labels: np.ndarray,
    chunk: int,
    covered: Sequence[int] | None = None,
) -> dict[int, dict[str, float]]:
    """``{d: {"top1", "top5"}}`` for every trained size ``d`` (top-5 becomes top-C with fewer classes).

    ``covered``: rank only these classes (a query set covering a subset of the classes, as the paper
    evaluates ImageNet-A and -R); softmax keeps the logits' order, so ranking its subset ranks theirs.
    """
    keep = None if covered is None else torch.as_tensor(list(covered), dtype=torch.long)
    k = min(5, head.num_classes if keep is None else len(keep))
    y = torch.from_numpy(np.asarray(labels))
    top1 = torch.zeros(len(head.nesting), dtype=torch.long)
    top5 = torch.zeros(len(head.nesting), dtype=torch.long)
    for rows, probs in head_probabilities(head, embeddings, chunk):
        if keep is None:
            topk = probs.topk(k, dim=-1).indices  # (G, B, k)
        else:
            topk = keep[probs[..., keep].topk(k, dim=-1).indices]
        hit = topk == y[rows][None, :, None]
        top1 += hit[..., 0].sum(1)
        top5 += hit.any(-1).sum(1)
    n = max(len(labels), 1)
    return {d: {"top1": float(top1[g]) / n, "top5": float(top5[g]) / n} for g, d in enumerate(head.nesting)}
