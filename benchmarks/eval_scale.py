"""Evaluation at scale: every size's k nearest from one pass against per-size faiss flat search.

    python benchmarks/eval_scale.py                          # 1M x 2048 float16 database, 10k queries
    python benchmarks/eval_scale.py --queries 2000           # the same database, fewer queries
    python benchmarks/eval_scale.py --k 1                    # 1-NN only (default: mrl-eval's k, 100)
    python benchmarks/eval_scale.py --device cuda --database 1281167 --queries 50000 --skip-faiss
    python benchmarks/eval_scale.py --quick                  # tiny sizes (smoke test)

A synthetic database (``--database`` x ``--dim`` float16, memory-mapped ``.npy``, written once into a
temporary folder) and float32 queries; each query's ``--k`` nearest by cosine at sizes 8, 16, ...,
``--dim`` (default: the deepest ``retrieval.ks`` of conf/eval.yaml, which mrl-eval searches):

- ``all sizes, one pass``: :func:`mrl.eval.prefix_search.search_all_sizes` (torch, ``--device``),
  ``mrl-eval search=one_pass`` (its default on a GPU);
- ``faiss flat, per size``: :func:`mrl.eval.knn.exact_search` once per size (faiss on the CPU),
  ``mrl-eval search=per_size`` (its default on the CPU).

Each method runs in a child process of its own, on the whole database and on its first tenth (memory
must stay flat as the database grows). Printed per run: seconds, and the peaks above the child's memory
before the search of its anonymous memory (RssAnon sampled every 2 ms: its own buffers, without the
pages of the memory-mapped database, which the page cache holds) and of VmHWM (those pages included);
then the speed ratio and how many queries got the same nearest neighbour from both (ties and float
rounding between near-equal scores aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import memory_peaks
from omegaconf import OmegaConf

METHODS = ("all sizes, one pass", "faiss flat, per size")


def sizes_up_to(dim: int) -> list[int]:
    """8, 16, ... up to ``dim`` (and ``dim`` itself)."""
    out, d = [], 8
    while d < dim:
        out.append(d)
        d *= 2
    return [*out, dim]


def write_data(folder: Path, rows: int, queries: int, dim: int, seed: int = 0) -> None:
    """``database.npy`` (float16, written in chunks) and ``queries.npy`` (float32): Gaussian clusters, so
    that neighbours are not arbitrary."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    db = np.lib.format.open_memmap(folder / "database.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
    step = 65536
    for start in range(0, rows, step):
        count = min(step, rows - start)
        noise = rng.standard_normal((count, dim), dtype=np.float32)
        db[start : start + count] = centres[rng.integers(0, len(centres), count)] + noise
    db.flush()
    del db
    q = centres[rng.integers(0, len(centres), queries)] + rng.standard_normal(
        (queries, dim), dtype=np.float32
    )
    np.save(folder / "queries.npy", q)


def evaluation_k() -> int:
    """How many neighbours mrl-eval searches per query by default: the deepest of conf/eval.yaml's
    ``retrieval.ks``."""
    return max(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval.yaml").retrieval.ks)


def child(method: str, folder: Path, rows: int, device: str, k: int, out: Path) -> None:
    """In a fresh process: one method's ``k`` nearest at every size over the first ``rows`` database
    rows; writes the nearest ids ``(Q, sizes)`` to ``out`` and prints one JSON line of time and memory
    peaks (MiB)."""
    import torch

    from mrl.eval.knn import exact_search
    from mrl.eval.prefix_search import search_all_sizes

    database = np.load(folder / "database.npy", mmap_mode="r")[:rows]
    queries = np.load(folder / "queries.npy")
    sizes = sizes_up_to(database.shape[1])
    with memory_peaks() as peaks:
        start = time.perf_counter()
        if method == METHODS[0]:
            found = search_all_sizes(database, queries, sizes, k, torch.device(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ids = np.stack([found[d][1][:, 0] for d in sizes], 1)
        else:
            per_size = [exact_search(database, queries, d, k, 4096, 262144, use_gpu=False) for d in sizes]
            ids = np.stack([found[1][:, 0] for found in per_size], 1)
        seconds = time.perf_counter() - start
    np.save(out, ids)
    print(json.dumps({"seconds": seconds, **peaks}))


def run_child(method: str, folder: Path, rows: int, device: str, k: int) -> tuple[dict, np.ndarray]:
    out = folder / f"ids_{METHODS.index(method)}_{rows}.npy"
    args = [
        "--child",
        method,
        "--dir",
        str(folder),
        "--rows",
        str(rows),
        "--device",
        device,
        "--k",
        str(k),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=os.environ
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {rows} rows failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="where the one-pass search runs: cpu, cuda")
    parser.add_argument("--skip-faiss", action="store_true", help="time the one-pass search alone")
    parser.add_argument("--k", type=int, default=evaluation_k(), help="neighbours per query")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.dir), args.rows, args.device, args.k, Path(args.out))
        return
    if args.quick:
        args.database, args.queries, args.dim = 20_000, 200, 256
    methods = METHODS[:1] if args.skip_faiss else METHODS
    sizes = sizes_up_to(args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_data(folder, args.database, args.queries, args.dim)
        print(
            f"data: {args.database} x {args.dim} float16 database, {args.queries} queries, written in "
            f"{time.perf_counter() - start:.0f} s; {args.k} nearest at sizes {sizes}",
            flush=True,
        )
        results: dict[tuple[str, int], tuple[dict, np.ndarray]] = {}
        for rows in (args.database // 10, args.database):
            for method in methods:
                results[method, rows] = run_child(method, folder, rows, args.device, args.k)
                print(f"{method}, {rows} rows: {results[method, rows][0]}", flush=True)
    line = "{:<24}{:>10}{:>11}{:>16}{:>18}"
    print(
        f"\n{args.k} nearest at {len(sizes)} sizes, {args.queries} queries; one pass on {args.device}, "
        "faiss on the CPU"
    )
    print(line.format("method", "database", "seconds", "peak anon MiB", "peak VmHWM MiB"))
    for (method, rows), (row, _) in results.items():
        print(
            line.format(
                method, rows, f"{row['seconds']:.1f}", f"{row['anon_mib']:.0f}", f"{row['hwm_mib']:.0f}"
            )
        )
    small, full = args.database // 10, args.database
    one = results[METHODS[0], full][0]
    growth = one["anon_mib"] / max(results[METHODS[0], small][0]["anon_mib"], 1e-9)
    print(f"one pass, peak anonymous memory at {full} rows / at {small}: {growth:.2f}")
    if not args.skip_faiss:
        other = results[METHODS[1], full]
        print(f"speed: faiss per size / one pass = {other[0]['seconds'] / one['seconds']:.2f}x")
        same = (results[METHODS[0], full][1] == other[1]).mean(0)
        agreement = ", ".join(f"d={d} {100 * s:.2f}%" for d, s in zip(sizes, same, strict=True))
        print(f"same 1-NN as faiss: {agreement}")


if __name__ == "__main__":
    main()
