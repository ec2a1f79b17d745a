"""Input pipeline on the CPU: host cost per batch, shard reading, decode + crop per core.

    python benchmarks/input_pipeline.py           # ImageNet-like sizes (about 2 minutes on 2 cores)
    python benchmarks/input_pipeline.py --quick   # tiny (smoke test)

1. Host cost of one training batch of 256 synthetic 224 px images: the float32 per-image items and
   default collate the synthetic set used before (images generated into memory, stacked per batch)
   against what the loader does now: item keys only (images rendered on the device), or uint8 images
   rendered into memory once and gathered per batch (``data.in_memory=true``).
2. Decode + crop per image on one core (one intra-op thread), on ImageNet-like 500x375 JPEGs of about
   110 KB (mrl.data.generate): timm's PIL transforms as the ImageFolder datamodule ran them before
   (``create_transform`` with the ResNet-50 data config, training and evaluation) against
   mrl.data.preprocess (torchvision decode, uint8 crop and resize; flip and normalisation are per batch
   on the device and not part of this).
3. The shard reader: encoded images per second out of LitData shards of those JPEGs, in the process
   and through one loader worker (what one worker hands on, before decoding), and decoded and cropped
   by all the cores' loader workers (``data.decode=cpu``).
4. Scale-out paths against local shards on one node: the reader of 3 (one worker, encoded bytes) on the
   same shards uploaded to an S3 store (moto's server on 127.0.0.1 in a process of its own: its work
   shares the cores), reading them the first time (chunks downloaded into ``data.cache_dir``) and again
   (cached); then ``mrl-train`` on the local shards as a 2-process DDP job (gloo, 127.0.0.1), its
   processes on one node (``trainer=ddp_cpu``) or on two (torchrun, one process a node): training
   images/s of rank 0, from its 3rd batch. Rounds alternate the variants.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _common import BIN, TRAIN_ONLY, median_ms
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, TensorDataset

from mrl.data import object_store
from mrl.data.generate import write_image_tree
from mrl.data.prepare import prepare_shards
from mrl.data.shards import METADATA_NAME, ShardDataModule
from mrl.data.synthetic import SyntheticDataModule

RESNET50 = {
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.95,
    "crop_mode": "center",
}


def host_batch_costs(batch: int, size: int, reps: int) -> None:
    n = 2 * batch
    # the old in-memory synthetic set: float32 items, stacked by the default collate
    old = DataLoader(
        TensorDataset(torch.randn(n, 3, size, size), torch.zeros(n, dtype=torch.long)), batch, shuffle=True
    )
    keys = SyntheticDataModule(img_size=size, train_size=n, batch_size=batch)
    in_memory = SyntheticDataModule(img_size=size, train_size=n, batch_size=batch, in_memory=True)
    rows = []
    for name, loader in (
        ("float32 items, default collate (before)", old),
        ("item keys, rendered on the device (now)", keys),
        ("uint8 in memory, gathered per batch (now)", in_memory),
    ):
        if isinstance(loader, SyntheticDataModule):
            loader.setup()
            loader = loader.train_dataloader()
        batches = _cycle(lambda epoch=loader: epoch)
        rows.append((name, median_ms(lambda b=batches: next(b), reps, warmup=2)))
    base = rows[0][1]
    print(f"\n1. host cost of one batch of {batch} synthetic {size} px images (median ms; before/now)")
    print(f"{'loader':<44}{'ms/batch':>10}{'before/now':>12}")
    for name, ms in rows:
        print(f"{name:<44}{ms:>10.2f}{base / ms:>12.1f}")


def _cycle(make: Callable[[], DataLoader]):
    while True:
        yield from make()


def decode_costs(jpegs: list[bytes], reps: int) -> None:
    from mrl.data.preprocess import CropSpec, ImageTransform, sample_rng

    timm_train = create_transform(input_size=(3, 224, 224), is_training=True, **RESNET50)
    timm_eval = create_transform(input_size=(3, 224, 224), is_training=False, **RESNET50)
    ours_train = ImageTransform(CropSpec.from_data_config(RESNET50, 224), train=True)
    ours_eval = ImageTransform(CropSpec.from_data_config(RESNET50, 224), train=False)
    count = [0]

    def cycled(fn: Callable[[bytes], object]) -> Callable[[], object]:
        def call() -> object:
            count[0] += 1
            return fn(jpegs[count[0] % len(jpegs)])

        return call

    def pil(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    rows = [
        (
            "training",
            median_ms(cycled(lambda d: timm_train(pil(d))), reps, warmup=2),
            median_ms(cycled(lambda d: ours_train(d, sample_rng(0, 0, count[0]))), reps, warmup=2),
        ),
        (
            "evaluation",
            median_ms(cycled(lambda d: timm_eval(pil(d))), reps, warmup=2),
            median_ms(cycled(ours_eval), reps, warmup=2),
        ),
    ]
    kb = statistics.mean(len(j) for j in jpegs) / 1024
    shape = Image.open(io.BytesIO(jpegs[1])).size
    print(f"\n2. decode + crop per image, one core, {shape[0]}x{shape[1]} JPEGs of {kb:.0f} KB (median ms)")
    print(
        f"{'path':<12}{'timm PIL (before)':>20}{'mrl uint8 (now)':>18}{'speedup':>10}{'img/s/core now':>17}"
    )
    for name, before, now in rows:
        print(f"{name:<12}{before:>20.3f}{now:>18.3f}{before / now:>10.2f}{1000 / now:>17.0f}")


def loader_rate(input_dir: str, batch: int, decode: str, num_workers: int, batches: int, **data) -> float:
    """Training images/s out of ``data=shards``' loader over ``batches`` batches after the first (its
    workers started, first chunks open); ``decode=gpu``: encoded bytes, what a worker hands on."""
    dm = ShardDataModule(
        input_dir, img_size=224, batch_size=batch, num_workers=num_workers, decode=decode, **data
    )
    dm.configure_transforms(RESNET50)
    dm.setup()
    epochs = dm.train_dataloader()
    loader = _cycle(lambda: epochs)
    next(loader)
    start = time.perf_counter()
    got = 0
    for _ in range(batches):
        got += len(next(loader)[-2 if decode == "gpu" else 1])
    return got / (time.perf_counter() - start)


def shard_rates(shards: Path, batch: int, workers: int, batches: int) -> None:
    dm = ShardDataModule(str(shards), img_size=224, batch_size=batch, num_workers=0, decode="gpu")
    dm.setup()
    raw = iter(dm.datasets["train"])  # what a worker reads: the shuffled training split
    n = min(len(dm.datasets["train"]), 2000)
    start = time.perf_counter()
    for _ in range(n):
        next(raw)
    in_process = n / (time.perf_counter() - start)
    print(f"\n3. shard reading ({len(dm.datasets['train'])} training images, shuffled, batch {batch})")
    print(f"{'what':<58}{'img/s':>10}")
    print(f"{'encoded bytes, in the process (ImageShards items)':<58}{in_process:>10.0f}")
    one = loader_rate(str(shards), batch, "gpu", 1, batches)
    print(f"{'encoded bytes, one loader worker (data.decode=gpu loader)':<58}{one:>10.0f}")
    decoded = f"decoded + cropped 224 px, {workers} loader workers (decode=cpu)"
    print(f"{decoded:<58}{loader_rate(str(shards), batch, 'cpu', workers, batches):>10.0f}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_store() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 in a process of its own, with a bucket ``bucket``; this process's
    AWS variables point at it while the block runs (loader workers inherit them)."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    saved = dict(os.environ)
    os.environ.update({**aws, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        for _ in range(200):  # up within seconds
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        object_store.client().create_bucket(Bucket="bucket")
        yield "s3://bucket"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait()


def train_rate(args: list[str], workdir: Path, launch: str) -> float:
    """Training images/s of rank 0 (EpochTimer, from the 3rd batch) of a 2-process ``mrl-train`` DDP job
    on the CPU: ``launch="one node"`` (trainer=ddp_cpu, Lightning starts both processes) or ``"two
    nodes"`` (torchrun on 127.0.0.1, one process a node, as on a cluster)."""
    timer = workdir / f"timer_{time.monotonic_ns()}.json"
    job = [
        *args,
        *TRAIN_ONLY,
        "trainer=ddp_cpu",
        f"hydra.run.dir={workdir / timer.stem}",
        "+callbacks.timer._target_=mrl.tracking.timing.EpochTimer",
        f"+callbacks.timer.path={timer}",
        "+callbacks.timer.skip_batches=2",
    ]
    env = {**os.environ, "MRL_LOG_DIR": str(workdir / "logs"), "WANDB_MODE": "offline"}
    if launch == "one node":
        commands = [[str(BIN / "mrl-train"), *job, "trainer.devices=2"]]
    else:
        port = free_port()
        node = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        per_node = [*job, "trainer.devices=1", "trainer.num_nodes=2"]
        commands = [
            [
                str(BIN / "torchrun"),
                *node,
                f"--node_rank={rank}",
                "--no-python",
                str(BIN / "mrl-train"),
                *per_node,
            ]
            for rank in (0, 1)
        ]
    procs = [
        subprocess.Popen(c, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in commands
    ]
    outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"mrl-train ({launch}) failed:\n" + "\n".join(o[-3000:] for o in outputs))
    record = json.loads(timer.read_text())
    return record["samples"][0] / record["epoch_seconds"][0]


def scale_out(shards: Path, workdir: Path, batch: int, batches: int, rounds: int, quick: bool) -> None:
    """4. What object storage and several nodes add: the shard reader on an S3 store against the local
    folder, and a 2-process DDP job's training images/s on one node against two."""
    rates: dict[str, list[float]] = {}
    with s3_store() as bucket:
        uri = f"{bucket}/shards"
        object_store.upload_dir(shards, uri, last=METADATA_NAME)
        for r in range(rounds):
            cache = workdir / f"cache{r}"
            rows = {
                "local folder": (str(shards), {}),
                "S3 store, first read (chunks downloaded)": (uri, {"cache_dir": str(cache)}),
                "S3 store, chunks cached": (uri, {"cache_dir": str(cache)}),
            }
            for name, (where, data) in rows.items():
                rates.setdefault(name, []).append(loader_rate(where, batch, "gpu", 1, batches, **data))
    print(f"\n4. scale-out paths, median of {rounds} rounds")
    print(f"{'shard reader: encoded bytes, one loader worker':<58}{'img/s':>10}{'/ local':>9}")
    local = statistics.median(rates["local folder"])
    for name, values in rates.items():
        print(f"{name:<58}{statistics.median(values):>10.0f}{statistics.median(values) / local:>9.2f}")
    size = 32 if quick else 64
    args = [
        "data=shards",
        f"data.input_dir={shards}",
        f"data.img_size={size}",
        "data.batch_size=4" if quick else "data.batch_size=64",
        "data.num_workers=1",
        "backbone.name=test_byobnet",
        "trainer.max_epochs=1",
        "threads=1",
        "logger=csv",
    ]
    steps = {"one node, 2 processes (trainer=ddp_cpu)": [], "two nodes, 1 process each (torchrun)": []}
    for _ in range(rounds):
        steps["one node, 2 processes (trainer=ddp_cpu)"].append(train_rate(args, workdir, "one node"))
        steps["two nodes, 1 process each (torchrun)"].append(train_rate(args, workdir, "two nodes"))
    print(f"{'mrl-train, DDP over 2 processes on 127.0.0.1 (gloo), rank 0':<58}{'img/s':>10}{'/ one':>9}")
    one = statistics.median(steps["one node, 2 processes (trainer=ddp_cpu)"])
    for name, values in steps.items():
        print(f"{name:<58}{statistics.median(values):>10.0f}{statistics.median(values) / one:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the generated shards")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    quick = args.quick
    batch, size = (32, 64) if quick else (256, 224)
    print(f"torch {torch.__version__}, {cores} cores, one intra-op thread per process", flush=True)
    host_batch_costs(batch, size, reps=3 if quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        classes = 4 if quick else 100
        per_class = max(2, (64 if quick else args.images) // classes)
        jpeg_size = (100, 75) if quick else (500, 375)
        tree = write_image_tree(
            Path(tmp, "tree"), classes, {"train": per_class, "val": 1}, jpeg_size, workers=cores
        )
        jpegs = [p.read_bytes() for p in sorted(Path(tree, "train").glob("*/*.jpg"))[:50]]
        decode_costs(jpegs, reps=10 if quick else 400)
        shards = prepare_shards(str(tree), str(Path(tmp, "shards")), num_workers=cores, progress=False)
        shard_rates(shards, batch=32 if quick else 256, workers=cores, batches=2 if quick else 7)
        batch, batches = (16, 2) if quick else (128, 14)
        scale_out(Path(shards), Path(tmp), batch, batches, rounds=1 if quick else 3, quick=quick)


if __name__ == "__main__":
    main()
