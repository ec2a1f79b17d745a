"""Every benchmark script runs in its --quick mode (a smoke test: no timing is asserted), each in a process
of its own (slow tests)."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_head_loss_quick():
    out = run_quick("head_loss.py")
    assert (
        "fused/per-size" in out and "windowed" in out and "class-major fused" in out and "fixed cost" in out
    )
    assert "batch/base" in out and "nested bmm" in out and "loop, copied" in out
    assert "95% bootstrap interval" in out
    # The batched table's second row is the default job's head, read from its composed config.
    assert "default job's, B=256 D=256 C=10" in out


@pytest.mark.slow
def test_head_loss_profile_quick():
    assert "elementwise" in run_quick("head_loss.py", "--profile")


@pytest.mark.slow
def test_head_loss_small_heads_quick():
    out = run_quick("head_loss.py", "--small-heads")
    assert "at once/per size" in out and "MRL-E" in out and "   at once" in out


@pytest.mark.slow
def test_data_pipeline_quick():
    assert "delivered/consumed" in run_quick("data_pipeline.py")


@pytest.mark.slow
def test_platform_overhead_quick():
    out = run_quick("platform_overhead.py")
    assert "ratio" in out and "per round, mrl-train/bare" in out and "MatryoshkaAccuracy" in out


@pytest.mark.slow
def test_gpu_throughput_quick(tmp_path):
    out = run_quick("gpu_throughput.py", "--out", str(tmp_path / "table.md"))
    table = (tmp_path / "table.md").read_text()
    # every eager row ran (compilation is skipped on the CPU) and is compared with the bare step
    for row in (
        "bare step, eager",
        "mrl-train synthetic, eager",
        "mrl-train shards decode=cpu, eager",
        "mrl-train shards decode=gpu, eager",
        "mrl-train synthetic in memory, eager",
    ):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert "failed" not in line and "skipped" not in line, line
        assert row.startswith("bare") or "of bare" in line, line
    assert "skipped in --quick" in out


@pytest.mark.slow
def test_input_pipeline_quick():
    out = run_quick("input_pipeline.py")
    assert "before/now" in out and "img/s/core now" in out and "one loader worker" in out
    # the scale-out rows: the reader on an S3 store (moto) and a DDP job on one node and on two
    for row in (
        "S3 store, first read",
        "S3 store, chunks cached",
        "one node, 2 processes",
        "two nodes, 1 process",
    ):
        assert row in out


@pytest.mark.slow
def test_eval_speed_memory_quick():
    out = run_quick("eval_speed.py", "--part", "memory")
    assert "peak RSS" in out and "adaptive retrieval" in out


@pytest.mark.slow
def test_eval_speed_quick():
    # trains a tiny synthetic model, runs mrl-eval on it, then the memory part
    out = run_quick("eval_speed.py")
    assert "exact full-size search" in out and "speedup" in out and "peak RSS" in out


@pytest.mark.slow
def test_posthoc_quick():
    out = run_quick("posthoc.py")
    # every head job (the bare loop too) read the one cache the first extracted; both extraction sizes
    # measured and compared
    assert "feature cache entries after all jobs: 1" in out
    starts = ("end-to-end", "head=", "bare loop")
    rows = [line.split("  ")[0] for line in out.splitlines() if line.startswith(starts)]
    heads = ["head=mrl", "head=csr", "head=adaptor", "head=mrl, batch 64"]
    assert rows == ["end-to-end default job", *heads, "bare loop, head=mrl", "bare loop, z formed"]
    # the periodic checkpoints' part: both settings timed
    assert "every 50 steps / heads' default:" in out and "heads' default (epoch ends)" in out
    assert "peak anonymous" in out and "4N / N: cache" in out


@pytest.mark.slow
def test_eval_scale_quick():
    out = run_quick("eval_scale.py")
    # both methods at both database sizes, the ratio, and each size's 1-NN agreement with faiss
    rows = [line.split("  ")[0] for line in out.splitlines() if line.startswith(("all sizes", "faiss flat"))]
    assert rows.count("all sizes, one pass") == 2 and rows.count("faiss flat, per size") == 2
    assert "speed: faiss per size / one pass" in out and "peak anonymous memory at 20000 rows" in out
    agreement = out.split("same 1-NN as faiss: ")[1].splitlines()[0]
    assert agreement.count("%") == 6  # sizes 8 ... 256


def test_csr_step_quick(monkeypatch, capsys):
    # in this process: the CSR loss step's three decode rules, timed, at two widths
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script's own imports (_stats)
    module = _benchmark_module("csr_step")
    results = module.main(["--quick"])
    assert [r["width"] for r in results] == [8, 16] and all(
        r["sums_ms"] > 0 < r["dense_ms"] and r["default_ms"] > 0 for r in results
    )
    assert all(r["loss_difference"] < 1e-4 for r in results)
    out = capsys.readouterr().out
    assert "sums / default (95%)" in out and "dense / default (95%)" in out


def test_adaptor_step_quick(monkeypatch, capsys):
    # in this process: the two prefix-cosine losses, timed, at two widths
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script's own imports (_stats)
    module = _benchmark_module("adaptor_step")
    results = module.main(["--quick"])
    assert [(r["width"], r["sizes"]) for r in results] == [(8, 4), (32, 6)]
    assert all(r["adaptor_ms"] > 0 < r["supcon_ms"] for r in results)
    assert "adaptor ms" in capsys.readouterr().out
    assert module.sizes_up_to(2048) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def test_sparse_search_quick(capsys):
    # in this process: scipy's sparse search against torch's (on the CPU here), two code sizes
    # and the database's codes of every size from stored embeddings, sorted once and per size
    results = _benchmark_module("sparse_search").main(["--quick"])
    rows = results["search"]
    assert [r["k"] for r in rows] == [8, 32] and all(r["cpu_ms"] > 0 < r["device_ms"] for r in rows)
    assert all(r["same"] == 1.0 for r in rows)  # the same products on the CPU: the same neighbours
    assert results["codes"]["same"] is True and results["codes"]["once_s"] > 0
    out = capsys.readouterr().out
    assert "same top-k" in out and "sorted per size" in out


def test_gpu_checks_quick(tmp_path, capsys):
    # two of the checks' --quick runs, each in its process, and a budget too small for any check
    report = tmp_path / "checks.md"
    module = _benchmark_module("gpu_checks")
    ran = module.main(["--quick", "--only", "sparse_search", "csr_step", "--out", str(report)])
    assert ran == [("sparse_search", "exit 0"), ("csr_step", "exit 0")]
    text = report.read_text()
    assert "| sparse_search | `python benchmarks/sparse_search.py --quick` | exit 0 |" in text
    assert "same top-k" in text and "sums / default (95%)" in text  # each check's own table
    assert "same top-k" in (tmp_path / "checks_sparse_search.txt").read_text()
    skipped = module.main(["--budget", "10", "--out", str(tmp_path / "none.md")])
    assert {status for _, status in skipped} == {"skipped"}  # every GPU check's guard exceeds 10 s
    assert "skipped: 10 s of the budget left" in (tmp_path / "none.md").read_text()


def _benchmark_module(name: str):
    """benchmarks/<name>.py imported (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # registered first, as an import does: a dataclass in the script looks its module up there
    with patch.dict(sys.modules, {name: module}):
        spec.loader.exec_module(module)
    return module


def _stats_module():
    return _benchmark_module("_stats")


def test_paired_ratio_is_the_median_of_per_repetition_ratios_with_a_bootstrap_interval():
    paired_ratio = _stats_module().paired_ratio
    # Each repetition's pair is slowed alike (a drifting machine): the ratio is exact, the interval a point.
    slow = [1.0, 3.0, 2.0, 5.0, 4.0]
    assert paired_ratio([1.1 * t for t in slow], slow) == pytest.approx((1.1, 1.1, 1.1))
    # Ratios 1..9: median 5; the bootstrap interval lies within the ratios' range, around the median,
    # and narrows with more repetitions of the same spread.
    numerator = [float(r) for r in range(1, 10)]
    median, low, high = paired_ratio(numerator, [1.0] * 9)
    assert median == 5.0 and 1.0 <= low < 5.0 < high <= 9.0
    _, low_many, high_many = paired_ratio(numerator * 20, [1.0] * 180)
    assert high_many - low_many < high - low
    # Not the ratio of the medians, which is 2 / 2 = 1 here: the paired ratios are 0.1, 2 and 5.
    assert paired_ratio([1.0, 2.0, 10.0], [10.0, 1.0, 2.0])[0] == 2.0
