"""Post-hoc heads: training throughput on cached features against end-to-end, and extraction memory.

    python benchmarks/posthoc.py             # Fashion-MNIST, the default job vs head=mrl|csr|adaptor
    python benchmarks/posthoc.py --quick     # tiny synthetic data (smoke test)

1. Throughput. Each job is the ``mrl-train`` console script in a process of its own (``--quick``: in
   this one), W&B offline, ``threads=--threads`` (1: less noise on a shared host than both cores),
   training only (no validation, test or checkpoints),
   ``--batches`` training batches of one epoch, timed by the EpochTimer callback from the epoch's 6th
   batch on: images/s of training steps, loader included.
   The end-to-end job is the default job (test_byobnet on Fashion-MNIST, MRL head, batch 256); the
   head jobs are ``mrl-train source=backbone head=<kind>`` on the same data, reading the default
   backbone's cached pooled features (256 per image), as the jobs of a sweep do. The source's
   weights do not change the work, so the backbone's own (seeded, untrained) weights stand in for a
   trained source. Rounds alternate the jobs; per head the ratio of its images/s to the end-to-end
   job's, per round (each round's jobs ran back to back: ``_stats.paired_ratio``). The projection head
   also runs with ``--feature-batch`` features per step (``features.batch_size``): its own work per
   step is small next to the step's fixed cost (Lightning, the optimizer, metrics), which a larger
   batch spreads over more images. The first head job extracts the features (before its clock
   starts); the cache then holds one entry, which every later head job reads. ``bare loop,
   head=mrl`` is the projection head's job without the platform: the same module and cached batches
   in a plain PyTorch loop in this process (the job's loss step, its projection folded into the head
   where the job folds it, backward, the optimizer; no Lightning, metrics, logging or schedule),
   timed the same way: the ceiling of any training loop around this model at this batch. ``bare
   loop, z formed`` is the same loop with the step that forms ``z`` and runs the one-node head and
   loss on it, as the job did before the fold (``mrl.nn.folded_cross_entropy``).
2. Periodic checkpoints. A head job as users run it (its configured callbacks, a small validation, no
   ``callbacks=none``) on a ResNet-18 source (``source=backbone backbone.name=resnet18``, synthetic
   32x32 colour images, 100 steps per epoch), writing ``last.ckpt`` every 50 steps (end-to-end runs'
   ``checkpoint_every_n_steps``) against the heads' default (each epoch's end only): seconds per
   training epoch (EpochTimer, validation included, the first epoch left out), rounds alternating.
3. Extraction memory. ``FrozenFeatureDataModule.prepare_data`` (what a head job runs before training)
   on N and 4N synthetic Fashion-MNIST-shaped images, each in a fresh child process; the source is
   test_byobnet projected to 2048 features (``backbone.embed_dim=2048``, ResNet-50's width) so that the
   features of 4N images (float16 on disk) are far larger than a batch. Peaks over the extraction,
   above the process's memory just before it: VmHWM (reset with ``/proc/self/clear_refs``) and the
   anonymous memory (RssAnon, sampled every 2 ms: the process's own allocations, without the pages of
   the memory-mapped output file, which VmHWM counts while they are resident in the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import compose_cfg, memory_peaks, mrl_train_timing
from _stats import format_interval, paired_ratio

SKIP = 5  # batches before the clock starts (allocator and loader warm-up)
HEADS = ("mrl", "csr", "adaptor")


def images_per_second(args: list[str], workdir: Path) -> float:
    """Training images/s of one ``mrl-train`` job's first epoch, from its ``SKIP``-th batch on."""
    record = mrl_train_timing([*args, "trainer.max_epochs=1"], workdir, skip_batches=SKIP)
    return record["samples"][0] / record["epoch_seconds"][0]


def head_jobs(common: list[str], feature_batch: int) -> dict[str, list[str]]:
    """The head jobs by row name: each head at the data's batch size, and the projection head (the
    lightest step) also at ``feature_batch`` cached features per step (``features.batch_size``)."""
    jobs = {f"head={kind}": [*common, "source=backbone", f"head={kind}"] for kind in HEADS}
    jobs[f"head=mrl, batch {feature_batch}"] = [*jobs["head=mrl"], f"features.batch_size={feature_batch}"]
    return jobs


def bare_loop_images_per_second(
    args: list[str], workdir: Path, batches: int, threads: int, fold: bool = True
) -> float:
    """Training images/s of ``mrl-train args``'s head module in a plain loop over its cached features
    (read from ``workdir``'s cache, which the mrl-train jobs filled), from the ``SKIP``-th batch on;
    without ``fold``, the step forms ``z`` and runs the head on it (as before the fold)."""
    import lightning as L
    import torch

    from mrl.training.posthoc import assemble_posthoc

    cache = workdir / "logs" / "feature_cache"
    cfg = compose_cfg([*args, f"features.cache_dir={cache}"], str(workdir / "bare"))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        L.seed_everything(cfg.seed)  # as mrl-train: the same source weights, so the same cache entry
        module, datamodule = assemble_posthoc(cfg)
        datamodule.prepare_data()
        module.train()
        optimizer = module.optimizer_factory(module)
        images, start = 0, 0.0
        for index, (features, labels) in enumerate(datamodule.train_dataloader()):
            if index == SKIP:
                start = time.perf_counter()
            elif index == SKIP + batches:
                break
            projection_step(module, optimizer, features, labels, fold)
            images += len(labels) if index >= SKIP else 0
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def projection_step(module, optimizer, features, labels, fold: bool) -> None:
    """The projection head's training step on cached features as ``mrl-train`` computes it (with ``fold``,
    the projection folded into the head where that pays: ``per_size_from_projection``; else ``z`` formed
    and the one-node head and loss on it), without the per-size accuracy."""
    loss_of = module.criterion.per_size_loss
    if fold:
        body, last = module.backbone.feature_head.split_last()
        h = features if body is None else body(features)
        per_size, _ = loss_of.per_size_from_projection(module.head, last, h, labels)
    else:
        per_size, _ = loss_of.per_size_from_embedding(module.head, module(features), labels)
    loss = module.criterion.combine(per_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def throughput(data: list[str], batches: int, rounds: int, threads: int, feature_batch: int) -> None:
    """Print each round's images/s and the head jobs' ratios to the end-to-end job."""
    common = [*data, f"+trainer.limit_train_batches={SKIP + batches}", f"threads={threads}"]
    jobs = {"end-to-end default job": common, **head_jobs(common, feature_batch)}
    bare, formed = "bare loop, head=mrl", "bare loop, z formed"
    runs: dict[str, list[float]] = {name: [] for name in [*jobs, bare, formed]}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for r in range(rounds):
            for name, args in jobs.items():
                runs[name].append(images_per_second(args, workdir))
            runs[bare].append(bare_loop_images_per_second(jobs["head=mrl"], workdir, batches, threads))
            runs[formed].append(
                bare_loop_images_per_second(jobs["head=mrl"], workdir, batches, threads, fold=False)
            )
            measured = ", ".join(f"{name} {values[-1]:.0f}" for name, values in runs.items())
            print(f"round {r} (img/s): {measured}", flush=True)
        entries = len(list((workdir / "logs" / "feature_cache").iterdir()))
    # one entry: every head job read the features the first one extracted (before its clock started)
    print(f"feature cache entries after all jobs: {entries}")
    e2e = runs["end-to-end default job"]
    print(
        f"\ntraining images/s, at most {batches} batches of one epoch from the {SKIP + 1}th, "
        f"{threads} thread(s); head jobs with a warm feature cache"
    )
    row = "{:<26}{:>16}{:>50}"
    print(row.format("job", "img/s (median)", "/ end-to-end, per round (median, 95% interval)"))
    for name, values in runs.items():
        ratio = "1" if values is e2e else format_interval(paired_ratio(values, e2e))
        print(row.format(name, f"{statistics.median(values):.0f}", ratio))


# ---- periodic checkpoints -------------------------------------------------------------------------


def checkpoint_cost(data: list[str], rounds: int, threads: int, source: str) -> None:
    """Print a head job's training seconds per epoch as users run it (its configured callbacks and a
    small validation), writing ``last.ckpt`` every 50 steps (end-to-end runs' default) against the
    heads' default (``checkpoint_every_n_steps`` 0: each epoch's end only); the checkpoints hold the
    ``source`` backbone's weights."""
    job = [*data, "source=backbone", f"backbone.name={source}", "head=mrl", "test=false", "logger=none"]
    job += [f"threads={threads}", "trainer.max_epochs=3", "trainer.num_sanity_val_steps=0"]
    settings = {"every 50 steps": ["checkpoint_every_n_steps=50"], "heads' default (epoch ends)": []}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    size = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(rounds):
            for name, extra in settings.items():
                epochs = mrl_train_timing([*job, *extra], workdir, train_only=False)["epoch_seconds"]
                seconds[name].append(statistics.median(epochs[1:] or epochs))  # the first: warm-up
        size = max(p.stat().st_size for p in (workdir / "logs").rglob("last.ckpt")) / 2**20
    print(
        f"\nperiodic checkpoints of head=mrl on source=backbone ({source}), {size:.1f} MiB each; s per epoch"
    )
    print(f"{'checkpoints':<30}{'median':>10}   per round")
    for name, values in seconds.items():
        print(f"{name:<30}{statistics.median(values):>10.2f}   {' '.join(f'{v:.2f}' for v in values)}")
    ratio = statistics.median(seconds["every 50 steps"]) / statistics.median(
        seconds["heads' default (epoch ends)"]
    )
    print(f"every 50 steps / heads' default: {ratio:.2f}x")


# ---- extraction memory --------------------------------------------------------------------------


def extract_child(images: int, feature_dim: int, workdir: Path) -> None:
    """In a fresh process: a head job's feature extraction of ``images`` synthetic training images;
    prints one JSON line of its memory peaks above the state just before it (MiB)."""
    import torch
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.resolvers import register_resolvers
    from mrl.training.posthoc import assemble_posthoc

    torch.set_num_threads(1)
    register_resolvers()
    overrides = [
        "source=backbone",
        "head=mrl",
        f"backbone.embed_dim={feature_dim}",
        "data=synthetic",
        "data.in_chans=1",
        "data.img_size=28",
        f"data.train_size={images}",
        "data.val_size=256",
        "data.test_size=256",
        "data.eval_batch_size=256",
        f"paths.output_dir={workdir / 'job'}",
        f"features.cache_dir={workdir / 'cache'}",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    _, datamodule = assemble_posthoc(cfg)
    datamodule.images.setup(None)
    with memory_peaks() as peaks:
        start = time.perf_counter()
        datamodule.prepare_data()
        seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in datamodule.directory.glob("*.npy"))
    print(
        json.dumps(
            {
                "images": images,
                "seconds": seconds,
                "cache_mib": size / 2**20,
                **peaks,
            }
        )
    )


def extraction_memory(images: int, feature_dim: int) -> float:
    """Print the peaks of extracting N and 4N images' features; return the ratio of the anonymous
    memory's peaks (4N over N)."""
    rows = []
    for n in (images, 4 * images):
        with tempfile.TemporaryDirectory() as tmp:
            child = ["--extract-child", str(n), "--dim", str(feature_dim), "--dir", tmp]
            proc = subprocess.run(
                [sys.executable, __file__, *child],
                cwd=Path(__file__).parent,
                env={**os.environ, "MRL_LOG_DIR": str(Path(tmp) / "logs")},
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            tail = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            raise RuntimeError(f"extraction of {n} images failed:\n{tail}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"\nfeature extraction (prepare_data), test_byobnet -> {feature_dim} features, float16 cache; "
        "peaks above the process before it, MiB"
    )
    line = "{:>12}{:>10}{:>15}{:>18}{:>16}"
    print(line.format("train images", "seconds", "cache on disk", "peak RSS (VmHWM)", "peak anonymous"))
    for row in rows:
        numbers = (row["seconds"], row["cache_mib"], row["hwm_mib"], row["anon_mib"])
        print(line.format(row["images"], *(f"{x:.1f}" for x in numbers)))
    ratio = rows[1]["anon_mib"] / max(rows[0]["anon_mib"], 1e-9)
    print(
        f"4N / N: cache {rows[1]['cache_mib'] / rows[0]['cache_mib']:.2f}, "
        f"peak RSS {rows[1]['hwm_mib'] / max(rows[0]['hwm_mib'], 1e-9):.2f}, peak anonymous {ratio:.2f}"
    )
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    # 200: nearly a whole epoch of Fashion-MNIST (214 batches). A head job's 60 batches last a fraction of
    # a second, too short a window for a shared host: one pause of it moves that round's ratio.
    parser.add_argument("--batches", type=int, default=200, help="training batches timed per job (+5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--feature-batch", type=int, default=1024, help="the large-batch head job's batch")
    parser.add_argument("--images", type=int, default=16384, help="N of the extraction part (and 4N)")
    parser.add_argument("--dim", type=int, default=2048, help="the extraction part's feature width")
    parser.add_argument("--part", choices=("all", "throughput", "checkpoints", "memory"), default="all")
    parser.add_argument("--extract-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.extract_child:
        extract_child(args.extract_child, args.dim, Path(args.dir))
        return
    data: list[str] = []  # the default job's data: Fashion-MNIST
    # the checkpoints part: synthetic colour images and a ResNet-18 source (checkpoints of its whole weights)
    checkpoint_data = ["data=synthetic", "data.img_size=32", "data.train_size=25600", "data.val_size=512"]
    checkpoint_data += ["data.test_size=512"]
    checkpoint_source = "resnet18"
    if args.quick:
        _common.IN_PROCESS = True
        args.rounds, args.batches, args.images, args.dim, args.feature_batch = 1, 3, 512, 64, 64
        data = ["data=synthetic", "data.in_chans=1", "data.img_size=28", "data.train_size=512"]
        data += ["data.batch_size=32", "logger=none"]
        checkpoint_data, checkpoint_source = (
            [*data[:4], "data.val_size=64", "data.test_size=64"],
            "test_byobnet",
        )
    if args.part in ("all", "throughput"):
        throughput(data, args.batches, args.rounds, args.threads, args.feature_batch)
    if args.part in ("all", "checkpoints"):
        checkpoint_cost(checkpoint_data, args.rounds, args.threads, checkpoint_source)
    if args.part in ("all", "memory"):
        extraction_memory(args.images, args.dim)


if __name__ == "__main__":
    main()
