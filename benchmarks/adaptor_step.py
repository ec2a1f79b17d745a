"""The losses built on the prefixes' cosine similarities, forward + backward: Matryoshka-Adaptor's
(``head=adaptor``) and the Matryoshka contrastive loss (``objective=supcon``).

    python benchmarks/adaptor_step.py               # B=256, 256 and 2048 features, sizes 1 or 8 ... width
    python benchmarks/adaptor_step.py --device cuda
    python benchmarks/adaptor_step.py --quick       # tiny shapes (smoke test)

``adaptor``: ``MatryoshkaAdaptor.per_size`` on ``B`` frozen feature rows (hidden width = the features'),
its ``(G,)`` losses summed and back-propagated into the adaptor; ``supcon``: the contrastive loss of
``B`` rows (two views of ``B / 2`` images, 10 classes) back-propagated into the embedding. Both build
every size's ``(B, B)`` cosine similarities of the normalised prefixes
(``mrl.nn.matryoshka_contrastive.prefix_cosines``), whose cost this times; the median of ``--reps``
steps after a warm-up. Run it at two commits to compare their code on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mrl.nn.adaptor import MatryoshkaAdaptor
from mrl.nn.matryoshka_contrastive import matryoshka_contrastive_per_size


def sizes_up_to(width: int) -> list[int]:
    """Powers of two up to ``width``, from 1 for a small embedding (the recipe's 256), else from 8."""
    first = 1 if width <= 256 else 8
    return [2**p for p in range(first.bit_length() - 1, width.bit_length()) if 2**p <= width]


def median_ms(step: Callable[[], torch.Tensor], reps: int, device: str) -> float:
    """Median milliseconds of ``step()`` (a loss) and its backward."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for rep in range(reps + 2):  # two warm-up steps: allocator, kernels
        sync()
        start = time.perf_counter()
        step().backward()
        sync()
        if rep >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(width: int, batch: int, reps: int, device: str) -> dict:
    """Milliseconds per step of both losses at ``width`` features."""
    torch.manual_seed(0)
    nesting = sizes_up_to(width)
    adaptor = MatryoshkaAdaptor(width, nesting).to(device).train()
    with torch.no_grad():  # a trained-looking adaptor: its last layer starts at zero
        adaptor.residual[-1].weight.normal_(std=0.02)
    features = torch.randn(batch, width, device=device)
    z = torch.randn(batch, width, device=device, requires_grad=True)
    labels = torch.randint(0, 10, (batch // 2,), device=device)
    return {
        "width": width,
        "sizes": len(nesting),
        "adaptor_ms": median_ms(lambda: adaptor.per_size(features).sum(), reps, device),
        "supcon_ms": median_ms(
            lambda: matryoshka_contrastive_per_size(z, nesting, views=2, labels=labels).sum(), reps, device
        ),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.batch, args.widths = 2, 16, [8, 32]
    torch.set_num_threads(args.threads)
    print(
        f"prefix-cosine losses (forward + backward), B={args.batch}, {args.device}, {args.threads} "
        f"thread(s), median of {args.reps}"
    )
    row = "{:>7}{:>7}{:>14}{:>13}"
    print(row.format("width", "sizes", "adaptor ms", "supcon ms"))
    results = []
    for width in args.widths:
        result = measure(width, args.batch, args.reps, args.device)
        results.append(result)
        print(
            row.format(width, result["sizes"], f"{result['adaptor_ms']:.2f}", f"{result['supcon_ms']:.2f}"),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
