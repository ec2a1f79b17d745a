"""mrl-eval speed and memory: the whole evaluation's wall clock, funnel vs exact search, peak RSS at 1M x 512.

    python benchmarks/eval_speed.py                          # both parts; trains a 512-d model (~4 min)
    python benchmarks/eval_speed.py --part eval --ckpt <512-d last.ckpt>
    python benchmarks/eval_speed.py --part memory            # 1M x 512 synthetic database
    python benchmarks/eval_speed.py --quick                  # tiny sizes of both (smoke test)

eval: runs the real ``mrl-eval ckpt_path=<ckpt>`` (every method, W&B offline) as a child process in a
fresh output dir, so the embeddings are exported, not reused; prints its wall clock, its per-stage
seconds, its peak RSS, and from report.json every funnel row (flat and HNSW shortlists) against exact
full-size search: measured speedup in seconds per query, mAP@10 difference in points.

memory: writes a clustered-Gaussian database (``--rows`` x ``--dim`` float32, ``--classes`` labels) and
queries as .npy files in a temporary folder, then a child process memory-maps them and runs the
evaluators the way ``mrl.eval.run`` does, with conf/eval.yaml's chunks, funnels and baselines (a random
Matryoshka head stands in for a checkpoint's: its memory, not its accuracy, is what is measured). The
child's peak RSS (VmHWM, reset before each stage) counts the interpreter and libraries, the
memory-mapped embeddings' pages and every working buffer; the target is peak <= embeddings + 1 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
MIB = 1 << 20
GIB = 1 << 30
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# ------------------------------------------------------------------ child processes and their peak RSS
def run_child(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` with stdout+stderr to ``log``; return (exit code, wall seconds, peak RSS MiB).

    The peak is the child's own VmHWM, polled from /proc every 0.1 s (it is a high-water mark, so only a
    rise in the last 0.1 s could be missed). Not ``ru_maxrss`` from ``wait4``: that also covers the
    child's own children, and a library that forks the ~1 GB process reports a fork's RSS as the peak.
    """
    start = time.perf_counter()
    peak = 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            with contextlib.suppress(OSError, AttributeError):
                peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024)
            time.sleep(0.1)
    return proc.returncode, time.perf_counter() - start, peak


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return found.group(1).strip() if found else platform.machine()


def _peak_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``), for per-stage peaks."""
    # not permitted: the per-stage peaks are then running maxima, still correct overall
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------ memory: synthetic database
def write_database(folder: Path, rows: int, dim: int, classes: int, queries: int, seed: int = 0) -> int:
    """Clustered Gaussian embeddings (class centre + unit noise) as ``db.npy``/``q.npy`` + labels;
    returns the embeddings' bytes. Written in chunks, so the writer never holds the database."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    total = 0
    for name, n in (("db", rows), ("q", queries)):
        labels = rng.integers(0, classes, size=n)
        with open(folder / f"{name}.npy", "wb") as f:  # plain writes: no mapping grows this process's RSS
            header = {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
            np.lib.format.write_array_header_2_0(f, header)
            for s in range(0, n, 65_536):
                y = labels[s : s + 65_536]
                (centers[y] + rng.standard_normal((len(y), dim), dtype=np.float32)).tofile(f)
        np.save(folder / f"{name}_labels.npy", labels)
        total += n * dim * 4
    return total


def memory_child(folder: Path, knn_sizes: list[int], hnsw: bool, max_iter: int) -> None:
    """Run in the child: the evaluators on memory-mapped embeddings; print per-stage seconds and peaks."""
    stages: list[dict] = []
    clock = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages.append({"stage": name, "seconds": now - clock, "peak_mib": _peak_mib()})
        _reset_peak()
        clock = time.perf_counter()

    # the real mrl-eval process holds torch, Lightning, timm, faiss and sklearn: their memory counts
    import torch
    from omegaconf import OmegaConf

    from mrl.config_path import config_dir
    from mrl.eval.adaptive_classification import adaptive_classification
    from mrl.eval.adaptive_retrieval import FunnelSettings, adaptive_retrieval, exact_retrieval
    from mrl.eval.baseline_knn import posthoc_one_nn
    from mrl.eval.baselines import posthoc_baselines
    from mrl.eval.evaluators import FUNNEL_K, funnel_configs
    from mrl.eval.knn import knn_accuracy
    from mrl.eval.linear import linear_accuracy, max_softmax_predictions
    from mrl.eval.prefix_search import search_all_sizes
    from mrl.eval.retrieval import retrieval_metrics
    from mrl.nn.matryoshka_linear import MatryoshkaLinear
    from mrl.nn.nesting import default_nesting

    cfg = OmegaConf.load(Path(config_dir()) / "eval.yaml")
    chunks, ac, ar, bc = cfg.chunks, cfg.adaptive_classification, cfg.adaptive_retrieval, cfg.baselines
    mark("imports (as mrl-eval)")

    db = np.load(folder / "db.npy", mmap_mode="r")
    q = np.load(folder / "q.npy", mmap_mode="r")
    db_y, q_y = np.load(folder / "db_labels.npy"), np.load(folder / "q_labels.npy")
    dim, classes = db.shape[1], int(max(db_y.max(), q_y.max())) + 1
    nesting = default_nesting(dim, 1)
    torch.manual_seed(0)
    head = MatryoshkaLinear(dim, classes, nesting)  # random weights: memory, not accuracy
    linear_accuracy(head, q, q_y, chunks.head)
    pred, conf = max_softmax_predictions(head, q, chunks.head)
    adaptive_classification(
        pred,
        conf,
        q_y,
        nesting,
        targets=None,
        num_targets=ac.num_targets,
        calibration_fraction=ac.calibration_fraction,
        num_splits=2,
        grid_size=ac.grid_size,
        seed=0,
    )
    mark("linear + adaptive classification (random head)")

    ks = sorted(int(k) for k in cfg.retrieval.ks)
    kmax = max([*ks, int(cfg.knn.k)])
    rows = {"max_query_rows": chunks.query, "max_db_rows": chunks.database}
    found = search_all_sizes(db, q, knn_sizes, kmax, "cpu", **rows)  # every size in one pass, as mrl-eval
    for d in knn_sizes:
        ids = found[d][1]
        knn_accuracy(db_y[ids], q_y, int(cfg.knn.k), classes)
        retrieval_metrics(db_y[ids], q_y, db_y, ks)
    mark(f"knn + retrieval, d={','.join(map(str, knn_sizes))}")

    exact_retrieval(db, db_y, q, q_y, FUNNEL_K, chunks.query, chunks.database)
    mark("exact retrieval (full size)")
    settings = FunnelSettings(
        ar.hnsw_m, ar.hnsw_ef_construction, ar.hnsw_ef_search, chunks.query, chunks.database, chunks.rerank
    )
    adaptive_retrieval(db, db_y, q, q_y, funnel_configs(ar, dim), FUNNEL_K, hnsw, settings)
    mark("adaptive retrieval (" + ("flat + HNSW" if hnsw else "flat") + " shortlists)")

    posthoc_baselines(db, db_y, q, q_y, knn_sizes, knn_sizes, bc.max_train, max_iter, 0)
    mark(f"baselines: PCA + probes, d={','.join(map(str, knn_sizes))}, max_iter={max_iter}")
    if bc.knn:  # the 1-NN baselines (true, or auto: what standard and FF models get)

        def neighbours(d: int, k: int) -> np.ndarray:  # searched again, as for a size the kNN stage skipped
            return search_all_sizes(db, q, [d], k, "cpu", **rows)[d][1]

        posthoc_one_nn(db, db_y, q, q_y, knn_sizes, knn_sizes, chunks.query, chunks.database, neighbours)
        mark(f"baselines: 1-NN of PCA + slices, d={','.join(map(str, knn_sizes))}")
    print("RESULT " + json.dumps(stages), flush=True)
    # Skip interpreter shutdown: it pages in ~120 MB of library code (destructors) after the last
    # stage, which the parent's polling would report as the evaluation's peak.
    os._exit(0)


def memory_part(args: argparse.Namespace, workdir: Path) -> dict:
    folder = workdir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    size = write_database(folder, args.rows, args.dim, args.classes, args.queries)
    print(
        f"\n## memory: {args.rows:,} x {args.dim} float32 database + {args.queries:,} queries, "
        f"{args.classes} classes, memory-mapped ({size / MIB:.1f} MiB; written in "
        f"{time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if args.queries < 10_000:
        print(
            f"   ({args.queries} queries, not 10k: exact search over the whole database is slow on a "
            "small CPU; queries add memory only about their own size: a normalised copy and the results)"
        )
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        str(folder),
        "--knn-sizes",
        *map(str, args.knn_sizes),
        "--max-iter",
        str(args.max_iter),
        *(["--hnsw"] if args.hnsw else []),
    ]
    log = workdir / "memory_child.log"
    code, seconds, polled = run_child(cmd, workdir, ENV, log)
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"memory child failed ({code}):\n{text[-4000:]}")
    stages = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    libs = stages[0]["peak_mib"]
    print(f"{'stage':58} {'seconds':>8} {'peak RSS MiB':>13} {'- embeddings':>13} {'- libs':>8}")
    for s in stages:
        print(
            f"{s['stage']:58} {s['seconds']:8.1f} {s['peak_mib']:13.0f} {s['peak_mib'] - size / MIB:13.0f} "
            f"{s['peak_mib'] - size / MIB - libs:8.0f}"
        )
    peak = max(polled, *(s["peak_mib"] for s in stages))
    over = peak - size / MIB
    ok = over <= GIB / MIB
    print(
        f"peak RSS {peak:.0f} MiB = embeddings {size / MIB:.0f} MiB + {over:.0f} MiB (of which {libs:.0f} "
        f"MiB interpreter + libraries at import); target <= embeddings + 1024 MiB: "
        f"{'met' if ok else 'MISSED'}; child {seconds:.0f} s"
    )
    return {"embeddings_mib": size / MIB, "peak_mib": peak, "over_mib": over, "libs_mib": libs, "met": ok}


# ------------------------------------------------------------------ eval: the real mrl-eval on Fashion-MNIST
QUICK_TRAIN = [
    "data=synthetic",
    "data.train_size=512",
    "data.val_size=64",
    "data.test_size=128",
    "trainer.max_epochs=1",
    "backbone.embed_dim=32",
    "head.nesting=[4,8,16,32]",
    "logger=none",
    "threads=1",
]
QUICK_EVAL = [
    "threads=1",
    "logger=none",
    "adaptive_classification.num_splits=2",
    "adaptive_retrieval.funnel.shortlist_size=4",
    "adaptive_retrieval.funnel.rerank_sizes=[8,16,full]",
    "adaptive_retrieval.funnel.shortlists=[100,50,10]",
    "adaptive_retrieval.shortlist_sizes=[4]",
    "adaptive_retrieval.shortlist_k=100",
    "baselines.max_train=200",
]


def train(workdir: Path, overrides: list[str]) -> Path:
    """``mrl-train <overrides>`` in ``workdir``; its last.ckpt."""
    env = {**ENV, "MRL_LOG_DIR": str(workdir / "logs")}
    print(f"training: mrl-train {' '.join(overrides)}", flush=True)
    code, seconds, _ = run_child([str(BIN / "mrl-train"), *overrides], workdir, env, workdir / "train.log")
    if code != 0:
        raise RuntimeError(f"mrl-train failed:\n{(workdir / 'train.log').read_text()[-4000:]}")
    (ckpt,) = sorted((workdir / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    print(f"trained in {seconds:.0f} s: {ckpt}", flush=True)
    return ckpt


def eval_part(ckpt: Path, workdir: Path, overrides: list[str]) -> dict:
    logs = workdir / "eval_logs"  # fresh: the embeddings are exported, not reused
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [str(BIN / "mrl-eval"), f"ckpt_path={ckpt}", *overrides]
    print(f"\n## eval: {' '.join(['mrl-eval', *cmd[1:]])}", flush=True)
    log = workdir / "eval.log"
    code, wall, peak = run_child(cmd, workdir, {**ENV, "MRL_LOG_DIR": str(logs)}, log)
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"mrl-eval failed ({code}):\n{text[-4000:]}")
    (report_path,) = sorted(logs.glob("eval/runs/*/report.json"))
    report = json.loads(report_path.read_text())
    cached = "Reusing" in text
    stage_line = next((line for line in text.splitlines() if line.startswith("seconds: ")), "")
    print(
        f"wall clock {wall:.1f} s (target <= 180 s: {'met' if wall <= 180 else 'MISSED'}), peak RSS "
        f"{peak:.0f} MiB, embeddings {'reused' if cached else 'computed (not cached)'}"
    )
    print(f"stages (mrl-eval's own clock): {stage_line.removeprefix('seconds: ')}")
    exact = report["exact_retrieval"]
    print(
        f"exact full-size search: mAP@10 {100 * exact['map@10']:.2f}, "
        f"{1e3 * exact['seconds_per_query']:.3f} ms/query, {exact['mflops_per_query']:.2f} MFLOPs/query"
    )
    print(
        f"{'index':5} {'D_s':>4} {'rerank sizes':22} {'shortlists':22} {'mAP@10':>7} {'diff':>6}"
        f" {'ms/query':>9} {'speedup':>8} {'MFLOPs':>7}"
    )
    rows = []
    for r in report["adaptive_retrieval"]:
        row = {
            "index": r["index"],
            "shortlist_size": r["shortlist_size"],
            "rerank_sizes": r["rerank_sizes"],
            "shortlists": r["shortlists"],
            "map_diff_points": 100 * (r["map@10"] - exact["map@10"]),
            "speedup": exact["seconds_per_query"] / r["seconds_per_query"],
        }
        rows.append(row)
        print(
            f"{r['index']:5} {r['shortlist_size']:>4} {r['rerank_sizes']!s:22} {r['shortlists']!s:22} "
            f"{100 * r['map@10']:7.2f} {row['map_diff_points']:+6.2f} {1e3 * r['seconds_per_query']:9.3f} "
            f"{row['speedup']:7.1f}x {r['mflops_per_query']:7.3f}"
        )
    best = {
        kind: max(
            (r for r in rows if r["index"] == kind and r["map_diff_points"] >= -0.5),
            key=lambda r: r["speedup"],
            default=None,
        )
        for kind in ("flat", "hnsw")
    }
    for kind, r in best.items():
        if r is not None:
            print(
                f"best {kind} funnel within 0.5 points of exact mAP@10: {r['speedup']:.1f}x "
                f"({r['map_diff_points']:+.2f} points; target >= 5x: "
                f"{'met' if r['speedup'] >= 5 else 'MISSED'})"
            )
    return {"wall_s": wall, "peak_mib": peak, "cached": cached, "funnels": rows}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes of both parts (smoke test)")
    parser.add_argument("--part", choices=["all", "eval", "memory"], default="all")
    parser.add_argument("--ckpt", type=Path, help="a 512-d checkpoint (default: train one, ~4 min)")
    parser.add_argument("--eval-args", nargs="*", default=[], help="extra mrl-eval overrides")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--knn-sizes", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--max-iter", type=int, default=10, help="probe iterations (memory does not grow)")
    parser.add_argument("--hnsw", action="store_true", help="also HNSW shortlists in the memory part")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary folder)")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.knn_sizes, args.hnsw, args.max_iter)
        return {}
    if args.quick:
        args.rows, args.dim, args.classes, args.queries, args.knn_sizes = 20_000, 64, 50, 300, [8, 64]

    # versions without importing torch/faiss: this process stays small and quick to start
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "faiss-cpu", "numpy", "scikit-learn"))
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({_cpu_model()}), load average "
        f"{os.getloadavg()[0]:.1f}; {versions}; threads: the libraries' defaults"
    )
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.part in ("all", "eval"):
            if args.quick:
                ckpt = args.ckpt or train(workdir, QUICK_TRAIN)
                out["eval"] = eval_part(ckpt, workdir, [*QUICK_EVAL, *args.eval_args])
            else:
                ckpt = args.ckpt or train(workdir, ["backbone.embed_dim=512", "logger=csv"])
                out["eval"] = eval_part(ckpt.resolve(), workdir, args.eval_args)
        if args.part in ("all", "memory"):
            out["memory"] = memory_part(args, workdir)
            shutil.rmtree(workdir / "memory", ignore_errors=True)  # the database is gigabytes
    return out


if __name__ == "__main__":
    main()
