"""Every benchmark script runs in its --quick mode (a smoke test: no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

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


def test_head_loss_quick():
    out = run_quick("head_loss.py")
    assert (
        "fused/per-size" in out and "windowed" in out and "class-major fused" in out and "fixed cost" in out
    )
    assert "batch/base" in out


def test_head_loss_profile_quick():
    assert "elementwise" in run_quick("head_loss.py", "--profile")


def test_data_pipeline_quick():
    assert "delivered/consumed" in run_quick("data_pipeline.py")


@pytest.mark.slow
def test_platform_overhead_quick():
    assert "ratio" in run_quick("platform_overhead.py")


@pytest.mark.slow
def test_gpu_resnet50_quick():
    assert "MRL/standard" in run_quick("gpu_resnet50.py")


def test_eval_speed_memory_quick():
    out = run_quick("eval_speed.py", "--part", "memory")
    assert "peak RSS" in out and "adaptive retrieval" in out


@pytest.mark.slow
def test_eval_speed_quick():
    # trains a tiny synthetic model, runs mrl-eval on it, then the memory part
    out = run_quick("eval_speed.py")
    assert "exact full-size search" in out and "speedup" in out and "peak RSS" in out
