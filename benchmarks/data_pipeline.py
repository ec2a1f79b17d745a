"""Data pipeline: Fashion-MNIST batches/s delivered by the datamodule vs consumed by the default model.

    python benchmarks/data_pipeline.py           # the default job's data, model and batch size
    python benchmarks/data_pipeline.py --quick   # a few batches (smoke test)

"Delivered" iterates the training DataLoader and applies the datamodule's per-batch transform
(uint8 -> float, resize to the backbone's size, random flip, normalisation) exactly as training does.
"Consumed" is a full training step (forward, loss, backward, AdamW step) of the default model on one
batch. The loader is not the bottleneck when delivered/consumed is well above 1 (it runs in the same
process, so its time adds to the step time: delivered/consumed = k means the loader takes 1/k of it).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from types import SimpleNamespace

from _common import compose_cfg

from mrl.training.assemble import assemble


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="mrl-train overrides (default: the default job)")
    args = parser.parse_args(argv)
    batches = 3 if args.quick else args.batches
    overrides = list(args.overrides)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(overrides, out)
    module, data = assemble(cfg)
    data.setup("fit")
    train_loader = data.train_dataloader()  # built before the stand-in trainer below, which has no fit loop
    # The training-time transform (with flips) reads these trainer attributes.
    data.trainer = SimpleNamespace(training=True, current_epoch=0, global_step=0, global_rank=0)

    def deliver(n: int) -> float:
        start = time.perf_counter()
        for batch in itertools.islice(train_loader, n):
            data.on_after_batch_transfer(batch, 0)
        return n / (time.perf_counter() - start)

    deliver(2)  # warm-up
    delivered = deliver(batches)
    x, y = data.on_after_batch_transfer(next(iter(train_loader)), 0)
    optimizer = module.optimizer_factory(module)
    module.train()

    def step() -> None:
        loss = module.criterion(module.logits(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    n = max(2, batches // 5)
    start = time.perf_counter()
    for _ in range(n):
        step()
    consumed = n / (time.perf_counter() - start)
    print(
        f"batch {tuple(x.shape)}: delivered {delivered:.1f} batches/s, consumed {consumed:.1f} batches/s, "
        f"delivered/consumed {delivered / consumed:.1f}x (loader share of a step {consumed / delivered:.1%})"
    )
    return delivered, consumed


if __name__ == "__main__":
    main()
