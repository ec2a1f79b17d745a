"""Platform overhead: one training epoch through `mrl-train` vs a bare PyTorch loop, same everything.

    python benchmarks/platform_overhead.py           # test_byobnet, 10240 in-memory synthetic 32px images
    python benchmarks/platform_overhead.py --quick   # tiny (smoke test)

`mrl-train` runs as the console script (Hydra, Lightning, per-size torchmetrics, W&B offline, MRL head
and loss); its epoch time is taken inside the process by the EpochTimer callback (epoch start to end,
training batches only: validation, test and checkpoints are switched off in both). The bare loop builds
the same model from the same config (mrl.training.assemble) and runs forward, loss, backward,
optimizer and scheduler steps. Runs alternate, the first epoch of each run is dropped as warm-up, and
the ratio of medians is reported, then the median of the per-round ratios with its 95% bootstrap
interval (each round's two runs are neighbours in time, see ``_stats.paired_ratio``).

Then the per-step cost of the platform's per-size accuracy: one torchmetrics ``MulticlassAccuracy``
per size (what the module used before) vs one ``MatryoshkaAccuracy`` for all sizes (what it uses), for
a training step (top-1 from the predicted classes) and an evaluation step (top-1 and top-5 from logits).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _common
import torch
from _common import bare_loop_epochs, median_ms, mrl_train_epochs, steady
from _stats import format_interval, paired_ratio
from torchmetrics.classification import MulticlassAccuracy

from mrl.nn.matryoshka_accuracy import MatryoshkaAccuracy


def metric_update_costs(sizes: int, batch: int, classes: int, reps: int) -> None:
    """Print the per-step milliseconds of per-size accuracy: one metric per size, configured as the
    module configured them before ``MatryoshkaAccuracy``, vs one for all sizes."""
    predicted = torch.randint(0, classes, (sizes, batch))
    logits, target = torch.randn(sizes, batch, classes), torch.randint(0, classes, (batch,))
    per_size = {
        k: [MulticlassAccuracy(classes, top_k=k, average="micro", validate_args=False) for _ in range(sizes)]
        for k in (1, 5)
    }
    one = {k: MatryoshkaAccuracy(sizes, top_k=k) for k in (1, 5)}

    def per_size_train() -> None:
        for g, metric in enumerate(per_size[1]):
            metric.update(predicted[g], target)

    def per_size_eval() -> None:
        for k in (1, 5):
            for g, metric in enumerate(per_size[k]):
                metric.update(logits[g], target)

    def one_eval() -> None:
        one[1].update(logits, target)
        one[5].update(logits, target)

    print(f"per-size accuracy updates per step, G={sizes} B={batch} C={classes}, medians in ms")
    print(f"{'step':<8}{'one metric per size':>22}{'MatryoshkaAccuracy':>20}{'ratio':>8}")
    for step, old, new in (
        ("train", per_size_train, lambda: one[1].update(predicted, target)),
        ("eval", per_size_eval, one_eval),
    ):
        a, b = median_ms(old, reps, warmup=10), median_ms(new, reps, warmup=10)
        print(f"{step:<8}{a:>22.3f}{b:>20.3f}{b / a:>8.3f}")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=10240)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra mrl-train overrides applied to both")
    args = parser.parse_args(argv)
    size, batch, epochs, rounds = args.train_size, 256, args.epochs, args.rounds
    if args.quick:
        _common.IN_PROCESS = True  # a smoke test: the jobs in this process
        size, batch, epochs, rounds = 64, 32, 2, 1
    overrides = [
        "data=synthetic",
        "data.in_memory=true",
        f"data.train_size={size}",
        f"data.batch_size={batch}",
        f"trainer.max_epochs={epochs}",
        f"threads={torch.get_num_threads()}",
        *args.overrides,
    ]
    print("overrides:", " ".join(overrides), flush=True)
    bare, platform = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            bare.append(steady(bare_loop_epochs(overrides)))
            platform.append(steady(mrl_train_epochs(overrides, Path(tmp))))
            print(f"round {r}: bare {bare[-1]:.3f} s/epoch, mrl-train {platform[-1]:.3f} s/epoch", flush=True)
    b, p = statistics.median(bare), statistics.median(platform)
    print(f"epoch of {size} images, batch {batch}: bare {b:.3f} s, mrl-train {p:.3f} s, ratio {p / b:.3f}")
    print(
        f"per round, mrl-train/bare: {format_interval(paired_ratio(platform, bare))} (median, 95% interval)"
    )
    # The default job's head: nesting 1..256 (9 sizes), 10 classes, at this benchmark's batch size.
    metric_update_costs(sizes=9, batch=batch, classes=10, reps=20 if args.quick else 300)
    return p / b


if __name__ == "__main__":
    main()
