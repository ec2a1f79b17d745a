"""Matryoshka head + loss, forward + backward: fused vs the paper's per-size formulation vs one Linear+CE.

    python benchmarks/head_loss.py            # B=256, D=2048, nesting 8..2048, C in {1000, 21841}
    python benchmarks/head_loss.py --quick    # tiny shapes (smoke test)

Variants are run interleaved (one repetition of each in turn) and the medians compared as ratios, so a
shared, noisy machine slows them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mrl import MatryoshkaLinear, MatryoshkaLoss


class PerSizeMRL(nn.Module):
    """The paper's MRL code: a separate ``nn.Linear`` per size and one cross-entropy per size."""

    def __init__(self, dim: int, classes: int, nesting: list[int], efficient: bool) -> None:
        super().__init__()
        self.nesting, self.efficient = nesting, efficient
        if efficient:
            self.layers = nn.ModuleList([nn.Linear(dim, classes)])
        else:
            self.layers = nn.ModuleList([nn.Linear(m, classes) for m in nesting])

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = z.new_zeros(())
        for g, m in enumerate(self.nesting):
            if self.efficient:  # MRL-E in the paper's code: slice the one weight per size
                layer = self.layers[0]
                logits = F.linear(z[:, :m], layer.weight[:, :m], layer.bias)
            else:
                logits = self.layers[g](z[:, :m])
            loss = loss + F.cross_entropy(logits, y)
        return loss


class Fused(nn.Module):
    def __init__(self, dim: int, classes: int, nesting: list[int], efficient: bool, fused: bool) -> None:
        super().__init__()
        self.head = MatryoshkaLinear(dim, classes, nesting, efficient=efficient, fused=fused)
        self.loss = MatryoshkaLoss(fused=fused)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.head(z), y)


class Plain(nn.Module):
    """A standard model's head: one Linear on the full embedding and one cross-entropy."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(z), y)


def step_time(model: nn.Module, z: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    z.grad = None
    start = time.perf_counter()
    model(z, y).backward()
    return time.perf_counter() - start


def run_case(batch: int, dim: int, classes: int, nesting: list[int], efficient: bool, reps: int) -> dict:
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(classes, (batch,))
    variants: dict[str, Callable] = {
        "fused": Fused(dim, classes, nesting, efficient, fused=True),
        "per_size": PerSizeMRL(dim, classes, nesting, efficient),
        "reference": Fused(dim, classes, nesting, efficient, fused=False),
        "plain": Plain(dim, classes),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for model in variants.values():  # warm-up (allocator, oneDNN/BLAS kernels)
        step_time(model, z, y)
    for _ in range(reps):
        for name, model in variants.items():
            times[name].append(step_time(model, z, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "head": "MRL-E" if efficient else "MRL",
        "C": classes,
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        "fused/per_size": med["fused"] / med["per_size"],
        "fused/plain": med["fused"] / med["plain"],
        "reference/per_size": med["reference"] / med["per_size"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 21841])
    args = parser.parse_args(argv)
    if args.quick:
        batch, dim, classes, reps = 16, 64, [10, 33], 2
    else:
        batch, dim, classes, reps = 256, 2048, args.classes, args.reps
    nesting = [2**i for i in range(3, dim.bit_length())]  # 8, 16, ..., dim
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, B={batch} D={dim} nesting={nesting}")
    header = f"{'head':6} {'C':>6} {'fused ms':>9} {'per-size':>9} {'ref ms':>8} {'plain':>8}"
    print(header + f" {'fused/per-size':>15} {'fused/plain':>12} {'ref/per-size':>13}", flush=True)
    rows = []
    for efficient in (True, False):
        for c in classes:
            r = run_case(batch, dim, c, nesting, efficient, reps)
            rows.append(r)
            print(
                f"{r['head']:6} {c:>6} {r['fused_ms']:9.1f} {r['per_size_ms']:9.1f} {r['reference_ms']:8.1f} "
                f"{r['plain_ms']:8.1f} {r['fused/per_size']:15.3f} {r['fused/plain']:12.3f} "
                f"{r['reference/per_size']:13.3f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
