"""Fixtures: run the real commands on tiny data in a temporary folder. Helpers are in support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import CLIResult, call_main, run_command, write_fashion_mnist


@pytest.fixture
def run_cli(tmp_path):
    """Run a console script (``mrl-train`` ...) as a process in ``tmp_path``, its logs under
    ``tmp_path/logs``."""

    def run(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> CLIResult:
        return run_command(script, *args, cwd=tmp_path, env=env, timeout=timeout)

    return run


@pytest.fixture
def run_main(tmp_path, capfd):
    """Run a console script's ``main`` in this process, as ``run_cli`` runs the script (same command
    line, environment, folder and logs; its exit status and output) without a process start: for
    refusals and short runs without W&B or DDP. It reads the output with ``capfd`` (pytest allows no
    ``capsys`` beside it)."""

    def run(script: str, *args: str, env: dict | None = None) -> CLIResult:
        return call_main(script, *args, cwd=tmp_path, capture=capfd, env=env)

    return run


@pytest.fixture
def tiny_fashion_mnist(tmp_path) -> Path:
    """A Fashion-MNIST folder in the Debian layout with 300 train and 100 test learnable images."""
    return write_fashion_mnist(tmp_path / "fmnist")


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
