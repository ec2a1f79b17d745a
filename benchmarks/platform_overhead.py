"""Platform overhead: one training epoch through `mrl-train` vs a bare PyTorch loop, same everything.

    python benchmarks/platform_overhead.py           # test_byobnet, 10240 in-memory synthetic 32px images
    python benchmarks/platform_overhead.py --quick   # tiny (smoke test)

`mrl-train` runs as the console script (Hydra, Lightning, per-size torchmetrics, W&B offline, MRL head
and loss); its epoch time is taken inside the process by the EpochTimer callback (epoch start to end,
training batches only: validation, test and checkpoints are switched off in both). The bare loop builds
the same model from the same config (mrl.train.build_module) and runs forward, loss, backward,
optimizer and scheduler steps. Runs alternate, the first epoch of each run is dropped as warm-up, and
the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import bare_loop_epochs, mrl_train_epochs, steady


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
    return p / b


if __name__ == "__main__":
    main()
