"""GPU throughput: `mrl-train` against the GPU's own limit, for synthetic data and for JPEG shards.

    python benchmarks/gpu_throughput.py --out $OUT/gpu_throughput.md   # one CUDA GPU, under 8 minutes
    python benchmarks/gpu_throughput.py --quick                         # tiny CPU run of the same code

ResNet-50, 224 px, bf16 autocast, channels_last, batch 256, MRL head (nesting 8 .. 2048), 1000 classes.

- "bare step": forward, loss, backward and optimizer step of the model `mrl-train` builds from the same
  config, on one batch already on the GPU, normalised: the GPU's own limit for this model.
- `mrl-train` rows run the console script (Hydra, Lightning, per-size metrics, W&B offline, the
  progress bar) with validation, test and checkpoints off. Throughput is the median of the epochs
  after the first, each clocked by the EpochTimer callback from its 5th batch to its end (the steady
  state: loader workers start once per epoch, which a benchmark epoch of ~80 steps would overstate and
  a real epoch of thousands of steps spreads out).
  - synthetic: the loader hands over item keys, the GPU renders the images;
  - synthetic in memory: uint8 images in host memory, copied to the GPU per batch;
  - shards: ImageNet-like JPEGs (500x375, about 110 KB, made here with mrl.data.generate), written by
    mrl-prepare-data's function, decoded and cropped by the loader workers (decode=cpu, workers auto)
    or decoded by nvJPEG on the GPU (decode=gpu).
- Each row runs eager, then with `compile=true` where time allows.

Rows run in order of value, each only when the time left covers its estimate; a row that fails prints
its error and the rest go on. The table goes to stdout and to --out. Targets (issue 16): synthetic
>= 0.95 of the bare step, shards >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import _common
import torch
from _common import compose_cfg, mrl_train_timing, sync, train_step

SKIP_BATCHES = 5


def bare_step_rate(overrides: list[str], device: str, bf16: bool, compiled: bool, steps: int) -> float:
    """Images/s of training steps on one device-resident batch, the model built as mrl-train builds it."""
    from mrl.training.assemble import assemble

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(overrides, out)
    module, data = assemble(cfg)
    module.to(device).train()
    if compiled:
        module.backbone.compile()
    optimizer = module.optimizer_factory(module)
    batch = int(cfg.data.batch_size)
    x = torch.randn(batch, data.in_chans, data.img_size, data.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, data.num_classes, (batch,), device=device)

    for _ in range(max(3, steps // 5)):  # warm-up: allocator, cuDNN autotuning, compilation
        train_step(module, optimizer, x, y, device, bf16)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(module, optimizer, x, y, device, bf16)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def mrl_train_rate(overrides: list[str], workdir: Path, skip: int = SKIP_BATCHES) -> float:
    timing = mrl_train_timing(overrides, workdir, skip_batches=skip)
    rates = [n / s for n, s in zip(timing["samples"], timing["epoch_seconds"], strict=True) if n]
    if not rates:
        raise RuntimeError(f"no epoch had more than {skip} batches to time")
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def make_shards(root: Path, images: int, classes: int, size: tuple[int, int], workers: int) -> Path:
    from mrl.data.generate import write_image_tree
    from mrl.data.prepare import prepare_shards

    per_class = max(1, images // classes)
    tree = write_image_tree(root / "tree", classes, {"train": per_class, "val": 1}, size, workers=workers)
    return prepare_shards(str(tree), str(root / "shards"), num_workers=workers, progress=False)


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model and data (smoke test)")
    parser.add_argument(
        "--minutes", type=float, default=7.5, help="time budget; rows that do not fit are skipped"
    )
    parser.add_argument(
        "--steps", type=int, default=64, help="training steps per epoch of the synthetic rows"
    )
    parser.add_argument("--images", type=int, default=24000, help="JPEGs in the generated shards")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    cores = len(os.sched_getaffinity(0))
    skip = SKIP_BATCHES
    if args.quick:
        _common.IN_PROCESS = True  # a smoke test: the jobs in this process
        device, bf16, batch, pixels, classes, steps, images, skip = "cpu", False, 16, 32, 10, 4, 96, 1
        common = ["backbone.name=test_byobnet", "trainer=cpu", "head.nesting=[2,8,64]", "threads=2"]
        jpeg_size, estimates = (80, 60), None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_throughput.py needs a CUDA GPU; --quick runs the same code on the CPU.")
        device, bf16, batch, pixels, classes, steps, images = (
            "cuda",
            True,
            256,
            224,
            1000,
            args.steps,
            args.images,
        )
        common = ["backbone=resnet50", "trainer=gpu", "head.min_size=8"]
        jpeg_size = (500, 375)
        # seconds each row takes on an H200 (start-up, compilation, epochs), to skip what no longer fits
        estimates = {"bare": 25, "bare_c": 120, "train": 45, "train_c": 150, "prep": 60, "shards": 50}
    common = [*common, "channels_last=true", f"data.batch_size={batch}", f"trainer.max_epochs={args.epochs}"]
    synthetic = [
        *common,
        "data=synthetic",
        f"data.img_size={pixels}",
        f"data.num_classes={classes}",
        f"data.train_size={steps * batch}",
    ]
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else float("nan")
    import torchvision

    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {gpu}, {cores} cores, "
        f"/dev/shm {shm:.0f} GiB, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"batch {batch}, {pixels} px, {classes} classes"
    )
    print(header, flush=True)
    rows: list[tuple[str, float | None, str]] = []
    bare: dict[bool, float] = {}

    def row(name: str, estimate: str, run: Callable[[], float], compiled: bool = False, limit: float = 0.0):
        left = args.minutes * 60 - (time.monotonic() - started)
        if estimates is not None and left < estimates[estimate]:
            rows.append((name, None, f"skipped: {left:.0f} s left, needs ~{estimates[estimate]} s"))
        elif args.quick and compiled:
            rows.append((name, None, "skipped in --quick (compilation takes minutes on a CPU)"))
        else:
            try:
                value = run()
                base = bare.get(compiled) if name.startswith("mrl-train") else None
                note = "" if base is None else f"{value / base:.3f} of bare"
                if limit and base and not args.quick:  # tiny CPU runs measure per-step overhead only
                    note += f" (target {limit:.2f}: {'met' if value / base >= limit else 'NOT met'})"
                rows.append((name, value, note))
                if name.startswith("bare"):
                    bare[compiled] = value
            except Exception as err:  # a failed row must not cost the others their time
                traceback.print_exc()
                rows.append((name, None, f"failed: {type(err).__name__}: {str(err).splitlines()[-1][:200]}"))
        print(f"{rows[-1][0]:<44} {_fmt(rows[-1][1])} {rows[-1][2]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards: list[Path] = []
        shard_args = lambda decode: [  # noqa: E731
            *common,
            "data=shards",
            f"data.input_dir={shards[0]}",
            f"data.img_size={pixels}",
            f"data.decode={decode}",
            *(["data.num_workers=2"] if args.quick else []),
        ]

        def prepare() -> float:
            t0 = time.perf_counter()
            shards.append(make_shards(work, images, classes, jpeg_size, cores))
            return images / (time.perf_counter() - t0)

        row(
            "bare step, eager",
            "bare",
            lambda: bare_step_rate(synthetic, device, bf16, False, 8 if args.quick else 50),
        )
        row("mrl-train synthetic, eager", "train", lambda: mrl_train_rate(synthetic, work, skip), limit=0.95)
        row("generate + prepare shards (img/s)", "prep", prepare)
        if shards:
            row(
                "mrl-train shards decode=cpu, eager",
                "shards",
                lambda: mrl_train_rate(shard_args("cpu"), work, skip),
                limit=0.90,
            )
            row(
                "mrl-train shards decode=gpu, eager",
                "shards",
                lambda: mrl_train_rate(shard_args("gpu"), work, skip),
                limit=0.90,
            )
        row(
            "mrl-train synthetic in memory, eager",
            "train",
            lambda: mrl_train_rate([*synthetic, "data.in_memory=true"], work, skip),
            limit=0.95,
        )
        compiled = [*synthetic, "compile=true"]
        row(
            "bare step, compile",
            "bare_c",
            lambda: bare_step_rate(synthetic, device, bf16, True, 50),
            compiled=True,
        )
        row(
            "mrl-train synthetic, compile",
            "train_c",
            lambda: mrl_train_rate(compiled, work, skip),
            compiled=True,
            limit=0.95,
        )
        if shards:
            row(
                "mrl-train shards decode=cpu, compile",
                "train_c",
                lambda: mrl_train_rate([*shard_args("cpu"), "compile=true"], work, skip),
                compiled=True,
                limit=0.90,
            )
    lines = [header, "", "| run | img/s | |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {_fmt(value).strip()} | {note} |" for name, value, note in rows]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    return rows


def _fmt(value: float | None) -> str:
    return f"{value:>9.1f}" if value is not None else f"{'-':>9}"


if __name__ == "__main__":
    main()
