"""The datamodule of ``mrl-train source=...`` (FrozenFeatureDataModule, as ``assemble_posthoc`` builds it)
and its use of the feature cache: the cached rows are the source's features of the unaugmented images of
every split, a second run reuses them without a forward of the source, a changed source, data set or
preprocessing gets a cache of its own, and an interrupted or damaged cache is recomputed.

The cache's own files (markers, atomic writes, the reader's refusals) are tested in test_feature_cache.py;
here the frozen source is a seeded untrained export on a tiny Fashion-MNIST, in process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import mrl
from mrl.errors import MRLError
from mrl.training.posthoc import assemble_posthoc
from support import compose_train, torch_threads, write_fashion_mnist, write_untrained_export

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("frozen") / "fmnist")


def data(root: Path) -> list[str]:
    return [
        "data=fashion_mnist",
        f"data.data_dir={root}",
        "data.val_size=50",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "+data.limit_train=96",
        "+data.limit_eval=32",
    ]


@pytest.fixture(scope="module")
def source(fmnist, tmp_path_factory) -> Path:
    """A seeded untrained model of the tiny data set, exported (test_byobnet, 256 features, 32 px)."""
    return write_untrained_export(tmp_path_factory.mktemp("source") / "model.safetensors", *data(fmnist))


class Forwards:
    """Counts the source's forward calls (batches it computed); ``fail_at``: raise at that call."""

    def __init__(self, module: torch.nn.Module, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at
        module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the extraction stops here, as a killed process would")


def frozen(fmnist: Path, source: Path, cache: Path, *overrides: str):
    """The datamodule ``mrl-train source=<source>`` trains on, cache under ``cache``."""
    cfg = compose_train(*data(fmnist), f"source={source}", f"features.cache_dir={cache}", *overrides)
    return assemble_posthoc(cfg)[1]


def batches(datamodule, split: str) -> int:
    return len(datamodule.images.evaluation_loader(split))


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_the_cache_holds_the_sources_features_of_the_unaugmented_images(fmnist, source, tmp_path):
    datamodule = frozen(fmnist, source, tmp_path / "cache")
    assert datamodule.images.augment  # the data augments its training images; the features must not
    datamodule.prepare_data()
    datamodule.setup("fit")
    reference = mrl.load(source)  # the deployed model's own preprocessing of raw uint8 images
    for split in SPLITS:
        images, labels = (torch.stack(t) for t in zip(*datamodule.images.datasets[split], strict=True))
        expected = reference.embed(images, normalize=False).numpy()  # its pooled features (no projection)
        cached = datamodule.splits[split]
        assert cached.dtype == "float16" and cached.count == len(labels) and cached.dim == 256
        np.testing.assert_allclose(cached.features(), expected, rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(cached.labels(), labels.numpy())
    features, y = next(iter(datamodule.train_dataloader()))
    assert features.shape == (32, 256) and features.dtype == torch.float32 and y.shape == (32,)


def test_a_second_run_reuses_the_cache_whatever_its_head_and_batches(fmnist, source, tmp_path):
    first = frozen(fmnist, source, tmp_path / "cache")
    counted = Forwards(first.source)
    first.prepare_data()
    assert counted.calls == sum(batches(first, s) for s in SPLITS)
    first.prepare_data()  # the job, then Lightning's fit and test: computed once
    assert counted.calls == sum(batches(first, s) for s in SPLITS)
    written = mtimes(first.directory)
    again = frozen(
        fmnist,
        source,
        tmp_path / "cache",
        "head=csr",
        "head.nesting=[8,16]",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "features.batch_size=8",
        "seed=0",
    )
    reused = Forwards(again.source)
    again.prepare_data()
    assert again.directory == first.directory and reused.calls == 0
    assert mtimes(first.directory) == written
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.key]


def test_another_source_data_set_or_preprocessing_gets_its_own_cache(fmnist, source, tmp_path):
    key = frozen(fmnist, source, tmp_path / "cache").key
    other_weights = write_untrained_export(tmp_path / "other.safetensors", *data(fmnist), seed=1)
    # the same weights (same seed and shapes) evaluated on 64 px images: only the preprocessing differs
    other_size = write_untrained_export(tmp_path / "64px.safetensors", *data(fmnist), "data.img_size=64")
    keys = {
        "weights": frozen(fmnist, other_weights, tmp_path / "cache").key,
        "preprocessing": frozen(fmnist, other_size, tmp_path / "cache", "data.img_size=64").key,
        "validation split": frozen(fmnist, source, tmp_path / "cache", "data.val_size=60").key,
        "fewer images": frozen(fmnist, source, tmp_path / "cache", "data.limit_train=64").key,
    }
    assert mrl.load(other_size).backbone.state_dict().keys() == mrl.load(source).backbone.state_dict().keys()
    assert len({key, *keys.values()}) == 1 + len(keys), keys


def test_an_interrupted_extraction_is_computed_again(fmnist, source, tmp_path):
    stopped = frozen(fmnist, source, tmp_path / "cache")
    Forwards(stopped.source, fail_at=2)  # in the middle of the training split
    with pytest.raises(RuntimeError, match="stops here"):
        stopped.prepare_data()
    with pytest.raises(MRLError, match=r"features of the training split are not in .*run mrl-train again"):
        frozen(fmnist, source, tmp_path / "cache").setup("fit")
    rerun = frozen(fmnist, source, tmp_path / "cache")
    counted = Forwards(rerun.source)
    rerun.prepare_data()
    assert counted.calls == sum(batches(rerun, s) for s in SPLITS)
    # killed after the files were renamed into place but before the marker: the files are not trusted
    (rerun.directory / "val.json").unlink()
    after = frozen(fmnist, source, tmp_path / "cache")
    counted = Forwards(after.source)
    after.prepare_data()
    assert counted.calls == batches(after, "val") and (after.directory / "val.json").is_file()


def test_a_damaged_cache_is_refused_by_training_and_rebuilt_by_the_extraction(
    fmnist, source, tmp_path, caplog
):
    first = frozen(fmnist, source, tmp_path / "cache")
    first.prepare_data()
    path = first.directory / "test.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MRLError, match=r"features of split 'test' in .* are damaged .*Delete that folder"):
        frozen(fmnist, source, tmp_path / "cache").setup("fit")
    rebuilt = frozen(fmnist, source, tmp_path / "cache")
    counted = Forwards(rebuilt.source)
    with caplog.at_level(logging.WARNING, logger="mrl.data.feature_cache"):
        rebuilt.prepare_data()
    assert counted.calls == batches(rebuilt, "test")
    assert any("damaged" in r.message and "Rebuilding" in r.message for r in caplog.records)
    rebuilt.setup("fit")
    assert rebuilt.splits["test"].features().shape == (32, 256)


def test_only_the_first_process_of_a_node_computes_the_features(fmnist, source, tmp_path, monkeypatch):
    """Under torchrun every process runs the job; the others wait at Lightning's barrier for the first."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    other = frozen(fmnist, source, tmp_path / "cache")
    counted = Forwards(other.source)
    other.prepare_data()
    assert counted.calls == 0 and not other.directory.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    first = frozen(fmnist, source, tmp_path / "cache")
    first.prepare_data()
    other.setup("fit")  # after the barrier: what the first wrote
    assert other.splits["train"].count == 96
