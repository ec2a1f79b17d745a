"""Shared fixtures: run the real console scripts on tiny data in a temporary folder."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fault_injection import tests_on_pythonpath

BIN = Path(sys.executable).parent
# Fast, deterministic settings shared by the end-to-end tests: tiny synthetic images and one epoch.
TINY = ["debug=tiny"]  # conf/debug/tiny.yaml: a few seconds on 128 synthetic images


class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess, log_dir: Path) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.log_dir = log_dir

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def run_dirs(self, task: str = "train") -> list[Path]:
        return sorted((self.log_dir / task / "runs").glob("*"))

    def sweep_job_dirs(self, task: str = "train") -> list[Path]:
        sweeps = sorted((self.log_dir / task / "multiruns").glob("*"))
        assert len(sweeps) == 1, sweeps
        return sorted(
            (p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )


def compose_train(*overrides: str):
    """The config ``mrl-train <overrides>`` composes, outside a Hydra job (for building modules in tests)."""
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


@pytest.fixture
def run_cli(tmp_path):
    """Run a console script (``mrl-train`` ...) with its logs under ``tmp_path/logs``."""

    def run(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> CLIResult:
        log_dir = tmp_path / "logs"
        full_env = {
            **os.environ,
            "MRL_LOG_DIR": str(log_dir),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "HYDRA_FULL_ERROR": "0",
            **(env or {}),
        }
        full_env.pop("LOCAL_RANK", None)
        # the test-only callbacks (fault_injection.py, batch_recorder.py) load in the run and its workers
        full_env = tests_on_pythonpath(full_env)
        proc = subprocess.run(
            [str(BIN / script), *args],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CLIResult(proc, log_dir)

    return run


def read_results(job_dir: Path) -> dict[str, float]:
    return json.loads((job_dir / "results.json").read_text())


def wandb_run_dirs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


def wandb_inspect(run_dir: Path) -> tuple[dict, list[dict]]:
    """What really reached W&B: (summary object, history rows) from `wandb leet inspect --json`."""
    wandb = str(BIN / "wandb")
    summary = json.loads(
        subprocess.run(
            [wandb, "leet", "inspect", "--summary", "--json", str(run_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return summary, wandb_history(run_dir)


def wandb_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one ``kind`` ("history", "metric", ...) W&B wrote to the run's file so far (the run
    may still be running or be killed), from ``wandb leet inspect --json``."""
    lines = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    parsed = (json.loads(line) for line in lines if line.strip())
    return [r[kind] for r in parsed if r.get("type") == kind]


def wandb_metric_definitions(run_dir: Path) -> dict[str, dict]:
    """The run's ``define_metric`` records as W&B wrote them, by metric name (or glob)."""
    return {m.get("name") or m.get("glob_name"): m for m in wandb_records(run_dir, "metric")}


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows W&B wrote to the run's file so far."""
    return [record["item"] for record in wandb_records(run_dir, "history")]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_mnist(tmp_path) -> Path:
    """A Fashion-MNIST folder in the Debian layout with 300 train and 100 test learnable images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_image_tree(tmp_path_factory) -> Path:
    """An ImageFolder tree of small JPEGs: 4 classes, 24 train and 4 val images each (80x60 px)."""
    from mrl.data.generate import write_image_tree

    root = tmp_path_factory.mktemp("tree")
    return write_image_tree(root, classes=4, per_class={"train": 24, "val": 4}, size=(80, 60))


@pytest.fixture(scope="session")
def tiny_shards(tiny_image_tree, tmp_path_factory) -> Path:
    """``tiny_image_tree`` as shards (mrl-prepare-data's function, small chunks: several per split)."""
    from mrl.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "shards"
    return prepare_shards(str(tiny_image_tree), str(out), num_workers=2, chunk_bytes="40KB", progress=False)
