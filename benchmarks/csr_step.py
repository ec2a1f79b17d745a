"""CSR's training loss (``head=csr``), forward + backward: its codes decoded as sums of decoder rows, as
dense products, and by the module's default rule.

    python benchmarks/csr_step.py                  # B=256, features 256..2048, expansion 4, k 8..256
    python benchmarks/csr_step.py --device cuda    # the same on a GPU
    python benchmarks/csr_step.py --quick          # tiny shapes (smoke test)

``sums``: ``SparseAutoencoder.per_size`` decoding every code as the sum of its active decoder rows
(``sparse_decodes=True``, ``embedding_bag``: ``B * k`` rows of the features' width); ``dense``: the same
module decoding the dense ``(B, hidden)`` codes as products with the decoder (``sparse_decodes=False``,
``B * hidden`` rows); ``default``: the module's rule (``sparse_decodes=None``: on the CPU, sums for the
codes narrow enough, ``SUM_ROW_COST``, products for the wide and aux-k codes; products elsewhere). Every
other part of the step is unchanged, so the ratios are the decodes' share. The three run in turn,
repetition by repetition; each ratio is taken per repetition (its median and 95% bootstrap interval:
``_stats.paired_ratio``), so a shared machine's load slows all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _stats import format_interval, paired_ratio

from mrl.nn.sparse_autoencoder import SparseAutoencoder


def step_seconds(model: SparseAutoencoder, features: torch.Tensor) -> float:
    """Seconds of one training step's loss, forward and backward (``(G,)`` losses summed)."""
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if features.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    model.per_size(features).sum().backward()
    sync()
    return time.perf_counter() - start


RULES = {"sums": True, "dense": False, "default": None}  # SparseAutoencoder.sparse_decodes


def compare(width: int, batch: int, sizes: list[int], reps: int, device: str) -> dict:
    """Milliseconds per step of each decode rule at ``width`` input features, and the paired ratios of
    the other two to the default's."""
    torch.manual_seed(0)
    settings = {"in_features": width, "sizes": sizes, "expansion": 4}
    models = {name: SparseAutoencoder(**settings).to(device).train() for name in RULES}
    for name, model in models.items():
        model.load_state_dict(models["sums"].state_dict())
        model.sparse_decodes = RULES[name]
    features = torch.randn(batch, width, device=device)
    with torch.no_grad():  # the same losses every way (float32 sums in another order)
        losses = [model.per_size(features) for model in models.values()]
        difference = max((loss - losses[0]).abs().max().item() for loss in losses)
    times: dict[str, list[float]] = {name: [] for name in RULES}
    for model in models.values():  # warm-up: allocator, kernels
        step_seconds(model, features)
    for _ in range(reps):
        for name, model in models.items():
            times[name].append(step_seconds(model, features))
    return {
        "width": width,
        "hidden": models["sums"].hidden,
        **{f"{name}_ms": 1e3 * statistics.median(times[name]) for name in RULES},
        "sums_ratio": paired_ratio(times["sums"], times["default"]),
        "dense_ratio": paired_ratio(times["dense"], times["default"]),
        "loss_difference": difference,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.batch, args.widths, args.sizes = 2, 16, [8, 16], [2, 4]
    torch.set_num_threads(args.threads)
    print(
        f"CSR loss step (forward + backward), B={args.batch}, k={args.sizes}, expansion 4, "
        f"{args.device}, {args.threads} thread(s), median of {args.reps}"
    )
    row = "{:>7}{:>8}{:>9}{:>9}{:>11}{:>28}{:>28}{:>13}"
    header = (
        "width",
        "hidden",
        "sums ms",
        "dense ms",
        "default ms",
        "sums / default (95%)",
        "dense / default (95%)",
        "max |dloss|",
    )
    print(row.format(*header))
    results = []
    for width in args.widths:
        result = compare(width, args.batch, args.sizes, args.reps, args.device)
        results.append(result)
        print(
            row.format(
                width,
                result["hidden"],
                *(f"{result[f'{name}_ms']:.1f}" for name in RULES),
                format_interval(result["sums_ratio"]),
                format_interval(result["dense_ratio"]),
                f"{result['loss_difference']:.1e}",
            ),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
