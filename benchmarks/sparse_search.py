"""Exact search of CSR's sparse codes: scipy on the CPU against torch's sparse product on a device.

    python benchmarks/sparse_search.py --device cuda                      # ImageNet's shape, k = 256
    python benchmarks/sparse_search.py --device cuda --k-codes 32 64 256  # several code sizes
    python benchmarks/sparse_search.py --quick                            # tiny shapes, torch on the CPU

``mrl-eval`` of a CSR model ranks database codes by their inner product with each query code
(:func:`mrl.eval.sparse_codes.sparse_search`): scipy's CSR product on the CPU, or torch's on the GPU the
evaluation runs on. Synthetic codes stand in for a model's: ``--database`` and ``--queries`` rows of
``--hidden`` units (ImageNet's 1.28M x 50k and a 2048-feature source at expansion 4 by default), each
with ``k`` active units drawn around one of 1000 clusters (so neighbours mean something), L2-normalised
values, built directly as CSR matrices (never a dense ``(N, hidden)`` array). Per code size ``k``: both
searches of the ``--neighbours`` nearest, the device's on every query and scipy's on the first
``--cpu-queries`` (its product takes hours at full size), their seconds per query and ratio, and the
share of those queries whose neighbours are the same (rounding of near-equal scores aside).

``--part codes`` (on the CPU, where ``mrl-eval`` builds them): the database's codes of every size in
``--sizes`` from stored embeddings (``--codes-rows`` x ``--hidden`` float16, memory-mapped, each row a
clustered code of the largest size, as a CSR model exports them), sorted once for all sizes
(:func:`mrl.eval.sparse_codes.top_codes`, what ``mrl-eval`` runs) against sorted for each size on its own
(:func:`~mrl.eval.sparse_codes.top_k_csr` per size: a pass over the file each): seconds, and whether the
codes are the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from mrl.eval.knn import CHUNK_BYTES
from mrl.eval.sparse_codes import sparse_search, top_codes, top_k_csr
from mrl.eval.sparse_eval import BLOCK_BYTES, DEVICE_BLOCK_BYTES


def clustered_codes(rows: int, hidden: int, k: int, seed: int) -> sp.csr_matrix:
    """``rows`` codes of up to ``k`` active units (duplicates drawn are merged) of ``hidden``: each row's
    units lie near one of 1000 random centres of the unit range; positive values, each row unit length."""
    generator = torch.Generator().manual_seed(seed)
    parts, spread, chunk = [], max(4 * k, hidden // 64), 65536
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        centres = torch.randint(0, 1000, (n, 1), generator=generator) * hidden // 1000
        units = (centres + torch.randint(0, spread, (n, k), generator=generator)) % hidden
        values = torch.empty(n, k).exponential_(generator=generator)
        row_ids = torch.arange(n).repeat_interleave(k).numpy()
        entries = (values.flatten().numpy(), (row_ids, units.flatten().numpy()))
        part = sp.csr_matrix(entries, shape=(n, hidden), dtype=np.float32)
        part.sum_duplicates()
        norms = np.sqrt(np.asarray(part.multiply(part).sum(1))).ravel()
        parts.append(sp.diags(1 / np.maximum(norms, 1e-12)).astype(np.float32) @ part)
    return sp.vstack(parts, format="csr", dtype=np.float32)


def timed(fn) -> tuple[float, np.ndarray]:
    """Seconds and neighbour ids of one search."""
    start = time.perf_counter()
    ids, _ = fn()
    return time.perf_counter() - start, ids


def search_part(args: argparse.Namespace) -> list[dict[str, float]]:
    """Print the search table; return its rows."""
    device = torch.device(args.device)
    print(
        f"database {args.database} x {args.hidden} units, {args.queries} queries, top {args.neighbours}; "
        f"scipy on {torch.get_num_threads()} CPU thread(s) on the first {args.cpu_queries} queries, "
        f"torch on {device} on all"
    )
    line = "{:>6}{:>16}{:>18}{:>20}{:>10}{:>16}"
    print(line.format("k", "database nnz", "scipy ms/query", "torch ms/query", "ratio", "same top-k"))
    rows = []
    for k in args.k_codes:
        database = clustered_codes(args.database, args.hidden, k, seed=0)
        queries = clustered_codes(args.queries, args.hidden, k, seed=1)
        few = queries[: args.cpu_queries]
        cpu_seconds, cpu_ids = timed(
            lambda few=few, database=database: sparse_search(
                few, database, args.neighbours, block_bytes=BLOCK_BYTES
            )
        )
        on_device = lambda queries=queries, database=database: sparse_search(  # noqa: E731
            queries, database, args.neighbours, block_bytes=DEVICE_BLOCK_BYTES, device=device
        )
        on_device()  # warm-up: the device's context, kernels and allocator
        device_seconds, device_ids = timed(on_device)
        cpu_ms = 1e3 * cpu_seconds / few.shape[0]
        device_ms = 1e3 * device_seconds / args.queries
        same = np.mean(np.all(device_ids[: few.shape[0]] == cpu_ids, axis=1))
        ratio = f"{cpu_ms / device_ms:.1f}x"
        cells = (k, database.nnz, f"{cpu_ms:.3f}", f"{device_ms:.4f}", ratio, f"{same:.1%}")
        print(line.format(*cells), flush=True)
        rows.append({"k": k, "cpu_ms": cpu_ms, "device_ms": device_ms, "same": float(same)})
    return rows


def codes_part(rows: int, hidden: int, sizes: list[int]) -> dict[str, float]:
    """Print and return the seconds of building every size's database codes from stored embeddings,
    sorted once against sorted per size, and whether both give the same codes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.npy"
        stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, hidden))
        codes = clustered_codes(rows, hidden, max(sizes), seed=0)
        for start in range(0, rows, 8192):
            stored[start : start + 8192] = codes[start : start + 8192].toarray()
        stored.flush()
        del stored
        embeddings = np.load(path, mmap_mode="r")
        chunk = max(1, CHUNK_BYTES // (4 * hidden))  # mrl-eval's chunk of stored rows
        start = time.perf_counter()
        per_size = {k: top_k_csr(embeddings, k, chunk) for k in sizes}
        each = time.perf_counter() - start
        start = time.perf_counter()
        sorted_once = top_codes(embeddings, max(sizes), chunk)
        once = {k: sorted_once.csr(k) for k in sizes}
        one_pass = time.perf_counter() - start
    same = all((per_size[k] != once[k]).nnz == 0 for k in sizes)
    print(
        f"\ndatabase codes of k = {sizes} from {rows} x {hidden} float16 stored embeddings, "
        f"{torch.get_num_threads()} thread(s): sorted per size {each:.2f} s, sorted once {one_pass:.2f} s "
        f"({each / one_pass:.1f}x); the same codes: {same}"
    )
    return {"per_size_s": each, "once_s": one_pass, "same": same}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the parts asked for; return their results by part."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("search", "codes", "all"), default="search")
    parser.add_argument("--device", default="cuda", help="where torch's product runs")
    parser.add_argument("--database", type=int, default=1_281_167)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--k-codes", type=int, nargs="+", default=[256], help="active units per code")
    parser.add_argument("--neighbours", type=int, default=100, help="neighbours per query (mrl-eval's k)")
    parser.add_argument("--cpu-queries", type=int, default=200, help="queries scipy searches")
    parser.add_argument("--codes-rows", type=int, default=100_000, help="stored rows of --part codes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.database, args.queries, args.hidden = "cpu", 3000, 300, 512
        args.k_codes, args.neighbours, args.cpu_queries = [8, 32], 10, 50
        args.part, args.codes_rows, args.sizes = "all", 2000, [4, 16, 32]
    results: dict[str, object] = {}
    if args.part in ("search", "all"):
        results["search"] = search_part(args)
    if args.part in ("codes", "all"):
        results["codes"] = codes_part(args.codes_rows, args.hidden, args.sizes)
    return results


if __name__ == "__main__":
    main()
