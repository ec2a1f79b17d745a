"""GPU throughput: ResNet-50, 224 px, bf16, channels_last, with and without torch.compile.

    python benchmarks/gpu_resnet50.py           # needs a CUDA GPU (about 5-8 minutes on an H100)
    python benchmarks/gpu_resnet50.py --quick   # tiny CPU run of the same code path (smoke test)

For each (compile, head) in {eager, compile} x {mrl, standard}: images/s of a training epoch through
`mrl-train` (console script, Lightning bf16-mixed, per-size metrics, W&B offline; epoch time from the
EpochTimer callback) and through a bare loop (same model from the same config, torch.autocast bf16).
In-memory synthetic ImageNet-sized data (1000 classes), so the GPU, not JPEG decoding, is measured.
Targets: mrl-train >= 0.95x the bare loop; MRL head <= 1.02x the time of the standard head.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import bare_loop_epochs, mrl_train_epochs, steady


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model and data (smoke test)")
    parser.add_argument("--train-size", type=int, default=7680)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        device, bf16, compiles = "cpu", False, [False]
        size, batch = 64, 32
        common = [
            "backbone.name=test_byobnet",
            "data.img_size=32",
            "data.num_classes=10",
            "trainer=cpu",
            "trainer.max_epochs=2",
        ]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_resnet50.py needs a CUDA GPU; use --quick for the CPU smoke test.")
        device, bf16, compiles = "cuda", True, [False, True]
        size, batch = args.train_size, args.batch_size
        common = [
            "backbone=resnet50",
            "data.img_size=224",
            "data.num_classes=1000",
            "++data.pin_memory=true",
            "trainer=gpu",
            f"trainer.max_epochs={args.epochs}",
        ]
    common = [
        "data=synthetic",
        "data.in_memory=true",
        f"data.train_size={size}",
        f"data.batch_size={batch}",
        "channels_last=true",
        "head.min_size=8",
        *common,
    ]
    print("common overrides:", " ".join(common), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in compiles:
            for head in ("mrl", "standard"):
                overrides = [*common, f"head={head}", f"compile={str(compiled).lower()}"]
                bare = steady(bare_loop_epochs(overrides, device=device, bf16=bf16))
                platform = steady(mrl_train_epochs(overrides, Path(tmp)))
                images = size // batch * batch  # drop_last
                rows.append(
                    {"compile": compiled, "head": head, "bare": images / bare, "mrl": images / platform}
                )
                print(
                    f"compile={compiled!s:5} head={head:8} bare {images / bare:8.1f} img/s  "
                    f"mrl-train {images / platform:8.1f} img/s  mrl-train/bare {bare / platform:.3f}",
                    flush=True,
                )
    for compiled in compiles:
        by_head = {r["head"]: r for r in rows if r["compile"] == compiled}
        print(
            f"compile={compiled}: MRL/standard time ratio, mrl-train "
            f"{by_head['standard']['mrl'] / by_head['mrl']['mrl']:.3f}, bare "
            f"{by_head['standard']['bare'] / by_head['mrl']['bare']:.3f}"
        )
    return rows


if __name__ == "__main__":
    main()
