"""CSR's training loss (``head=csr``), forward + backward: sparse decodes against the dense products.

    python benchmarks/csr_step.py                  # B=256, features 256..2048, expansion 4, k 8..256
    python benchmarks/csr_step.py --device cuda    # the same on a GPU
    python benchmarks/csr_step.py --quick          # tiny shapes (smoke test)

``sparse``: ``SparseAutoencoder.per_size`` decoding each code as the sum of its active decoder rows
(``sparse_decodes=True``, ``embedding_bag``: ``B * k`` rows of the features' width); ``dense``: the same
module decoding the dense ``(B, hidden)`` codes as products with the decoder (``sparse_decodes=False``,
``B * hidden`` rows), every other part of the step unchanged, so the ratio is the decodes' share. Which
one a run uses by default is the module's rule (``sparse_decodes=None``: sums on the CPU).
The two run in turn, repetition by repetition; the ratio is taken per repetition (its median and 95%
bootstrap interval: ``_stats.paired_ratio``), so a shared machine's load slows both alike.
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


def compare(width: int, batch: int, sizes: list[int], reps: int, device: str) -> dict:
    """Milliseconds per step of both decodes at ``width`` input features, and their paired ratio."""
    torch.manual_seed(0)
    settings = {"in_features": width, "sizes": sizes, "expansion": 4}
    sparse = SparseAutoencoder(**settings).to(device).train()
    dense = SparseAutoencoder(**settings).to(device).train()
    dense.load_state_dict(sparse.state_dict())
    sparse.sparse_decodes, dense.sparse_decodes = True, False
    features = torch.randn(batch, width, device=device)
    with torch.no_grad():  # the same losses both ways (float32 sums in another order)
        difference = (sparse.per_size(features) - dense.per_size(features)).abs().max().item()
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for model in (sparse, dense):  # warm-up: allocator, kernels
        step_seconds(model, features)
    for _ in range(reps):
        times["sparse"].append(step_seconds(sparse, features))
        times["dense"].append(step_seconds(dense, features))
    return {
        "width": width,
        "hidden": sparse.hidden,
        "sparse_ms": 1e3 * statistics.median(times["sparse"]),
        "dense_ms": 1e3 * statistics.median(times["dense"]),
        "ratio": paired_ratio(times["dense"], times["sparse"]),
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
    row = "{:>8}{:>8}{:>12}{:>12}{:>40}{:>14}"
    header = ("width", "hidden", "sparse ms", "dense ms", "dense / sparse (95% interval)", "max |dloss|")
    print(row.format(*header))
    results = []
    for width in args.widths:
        result = compare(width, args.batch, args.sizes, args.reps, args.device)
        results.append(result)
        print(
            row.format(
                width,
                result["hidden"],
                f"{result['sparse_ms']:.1f}",
                f"{result['dense_ms']:.1f}",
                format_interval(result["ratio"]),
                f"{result['loss_difference']:.1e}",
            ),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
