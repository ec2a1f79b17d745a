"""Exported embeddings: every split (the training split too) read in order with the evaluation
preprocessing, so two evaluations of one model export the same numbers; and a disk without room for
them refused before anything is written, leaving nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mrl.errors import MRLError
from mrl.eval.embeddings import export_split
from mrl.training.assemble import assemble
from support import compose_train


def _image_folder_model(root: Path):
    """An (untrained) 16-d model for ``root``'s images, built as mrl-train builds it, and its datamodule."""
    cfg = compose_train(
        "data=imagefolder",
        f"data.root={root}",
        "data.img_size=32",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "backbone.embed_dim=16",
        "head.nesting=[4,16]",
    )
    torch.manual_seed(0)
    module, datamodule = assemble(cfg)
    datamodule.prepare_data()
    datamodule.setup(None)
    return module.eval(), datamodule


def _export(module, datamodule, split: str, out: Path) -> np.ndarray:
    torch.manual_seed(0)  # as each mrl-eval seeds itself
    z, _ = export_split(
        module, datamodule, split, out, {"run": out.name}, "float32", torch.device("cpu"), "32"
    )
    return np.asarray(z)


def test_two_evaluations_export_the_same_train_embeddings(tiny_image_tree, tmp_path):
    """The training split's images through the evaluation transform (resize, centre crop), in file order:
    the same numbers twice, and the numbers of a plain computation written here (not random crops)."""
    module, dm = _image_folder_model(tiny_image_tree)
    first = _export(module, dm, "train", tmp_path / "a")
    second = _export(module, dm, "train", tmp_path / "b")
    np.testing.assert_array_equal(first, second)

    files = [Path(path) for path, _ in dm.listings["train"].samples]
    transform = dm.image_transform(train=False)
    x = torch.stack([transform(torch.from_numpy(np.fromfile(f, dtype=np.uint8))) for f in files])
    with torch.no_grad():
        want = module(dm.batch_transform(x, train=False)).numpy()
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-5)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def test_embeddings_larger_than_the_free_space_are_refused_before_writing(monkeypatch, tmp_path):
    """The space check (N x D x itemsize against the disk's free bytes) names both and what to do."""
    module, dm = _tiny_synthetic_model()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(MRLError) as refused:
        export_split(module, dm, "test", tmp_path / "out", {}, "float32", torch.device("cpu"), "32")
    message = str(refused.value)
    assert "The test embeddings (64 x 16 float32) need 4.0 KiB but" in message
    assert "has 1000 B free; nothing was written" in message
    assert "embedding_dtype=float16" in message and "hydra.run.dir=" in message
    assert _leftovers(tmp_path / "out") == []


def test_a_disk_that_fills_while_reserving_is_a_clear_error(monkeypatch, tmp_path):
    """No room found when the file's blocks are reserved (a quota, or a disk filled by another job since
    the check): one paragraph, no temporary file left (a memmap written on would die of SIGBUS)."""
    module, dm = _tiny_synthetic_model()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(
        MRLError, match=r"Writing the test embeddings into .* failed \(No space left on device\)"
    ):
        export_split(module, dm, "test", tmp_path / "out", {}, "float32", torch.device("cpu"), "32")
    assert _leftovers(tmp_path / "out") == []


def _tiny_synthetic_model():
    cfg = compose_train(
        "debug=tiny", "data.test_size=64", "backbone.embed_dim=16", "head.nesting=[4,16]", "logger=none"
    )
    torch.manual_seed(0)
    module, datamodule = assemble(cfg)
    datamodule.setup(None)
    return module.eval(), datamodule
