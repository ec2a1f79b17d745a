"""The frozen-feature cache (mrl.data.feature_cache): reused when nothing changed, a new key when the
source, data or preprocessing change, an interrupted extraction never reused, a damaged cache rebuilt
(or refused by the read-only opener), memory that does not grow with the number of images, and the
cached loader."""

from __future__ import annotations

import json
import logging
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mrl.data.feature_cache import (
    CachedFeatures,
    extract_features,
    extract_splits,
    feature_cache_key,
    feature_loader,
    open_split,
    weights_digest,
)
from mrl.errors import MRLError

DATA = {"name": "tiny", "train_size": 40}
PREPROCESSING = {"img_size": 4, "mean": [0.5], "std": [0.25]}


class CountingModel(nn.Module):
    """Flatten + linear, counting its forward calls; raises at call ``fail_at`` when set."""

    def __init__(self, dim: int = 5, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, dim)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return self.linear(x.flatten(1))


def loader(n: int = 40, batch_size: int = 16, labels: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 1, 4, 4, generator=generator)
    tensors = (images, torch.arange(n) % 3) if labels else (images,)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def key_of(model: nn.Module, data=DATA, preprocessing=PREPROCESSING) -> str:
    return feature_cache_key(model, data, preprocessing)


def test_features_and_labels_are_the_models_outputs_in_order(tmp_path):
    model = CountingModel()
    split = extract_features(model, loader(), tmp_path, key_of(model), "train", dtype="float32")
    images, labels = loader().dataset.tensors
    with torch.no_grad():
        want = model.linear(images.flatten(1)).numpy()
    np.testing.assert_array_equal(split.features(), want)
    np.testing.assert_array_equal(split.labels(), labels.numpy())
    marker = json.loads((tmp_path / split.key / "train.json").read_text())
    assert {k: marker[k] for k in ("key", "shape", "dtype", "count")} == {
        "key": split.key,
        "shape": [40, 5],
        "dtype": "float32",
        "count": 40,
    }


def test_float16_storage_and_no_labels(tmp_path):
    model = CountingModel()
    split = extract_features(model, loader(labels=False), tmp_path, key_of(model), "val")
    assert split.features().dtype == np.float16 and split.labels() is None
    batch = next(iter(feature_loader(split, batch_size=8, shuffle=False)))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32 and batch.shape == (8, 5)


def test_the_cache_is_reused_when_nothing_changed(tmp_path):
    model = CountingModel()
    first = extract_features(model, loader(), tmp_path, key_of(model), "train")
    calls = model.calls
    again = extract_features(model, loader(), tmp_path, key_of(CountingModel()), "train")
    assert model.calls == calls == 3 and again == first


def test_every_split_of_one_key_is_cached_beside_the_others(tmp_path):
    model = CountingModel()
    loaders = {"train": loader(40), "val": loader(20), "test": loader(8)}
    splits = extract_splits(model, loaders, tmp_path, key_of(model), progress=False)
    assert {name: s.count for name, s in splits.items()} == {"train": 40, "val": 20, "test": 8}
    assert model.calls == 3 + 2 + 1
    assert extract_splits(model, loaders, tmp_path, key_of(model)) == splits and model.calls == 6


def test_a_changed_source_data_or_preprocessing_gets_a_new_key(tmp_path):
    model = CountingModel()
    base = key_of(model)
    changed = CountingModel()
    with torch.no_grad():
        changed.linear.bias[0] += 1e-3
    keys = {
        base,
        key_of(changed),
        key_of(model, data={**DATA, "train_size": 41}),
        key_of(model, preprocessing={**PREPROCESSING, "img_size": 8}),
    }
    assert len(keys) == 4
    assert feature_cache_key(weights_digest(model), DATA, PREPROCESSING) == base
    assert weights_digest(model.state_dict()) == weights_digest(model)
    extract_features(model, loader(), tmp_path, base, "train")
    calls = model.calls
    # the changed source's key finds nothing: its features are computed, never the stale ones read
    split = extract_features(changed, loader(), tmp_path, key_of(changed), "train")
    assert changed.calls == calls and split.directory.name == key_of(changed)
    assert not np.array_equal(split.features(), open_split(tmp_path, base, "train").features())


def test_buffers_change_the_key():
    model = nn.BatchNorm1d(3)
    before = weights_digest(model)
    model.running_mean += 1
    assert weights_digest(model) != before


def test_an_interrupted_extraction_is_not_reused(tmp_path):
    failing = CountingModel(fail_at=2)
    key = key_of(failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(failing, loader(), tmp_path, key, "train")
    assert open_split(tmp_path, key, "train") is None
    assert not list((tmp_path / key).iterdir())  # no temporary file left behind either
    model = CountingModel()
    split = extract_features(model, loader(), tmp_path, key, "train")
    assert model.calls == 3 and split.count == 40


def test_a_killed_extraction_leaves_no_marker_and_is_redone(tmp_path):
    """A process killed before the marker (no cleanup ran): files without a marker are not a cache."""
    model = CountingModel()
    key = key_of(model)
    directory = tmp_path / key
    directory.mkdir()
    np.save(directory / "train.npy", np.zeros((40, 5), dtype=np.float16))
    (directory / ".train.npy.dead.tmp").write_bytes(b"partial")
    assert open_split(tmp_path, key, "train") is None
    split = extract_features(model, loader(), tmp_path, key, "train")
    assert model.calls == 3 and np.abs(split.features()).sum() > 0


def damage_truncate(split) -> None:
    data = split.features_path.read_bytes()
    split.features_path.write_bytes(data[: len(data) // 2])


def damage_marker(split) -> None:
    (split.directory / "train.json").write_text("{not json")


def damage_key(split) -> None:
    marker = json.loads((split.directory / "train.json").read_text())
    (split.directory / "train.json").write_text(json.dumps({**marker, "key": "0" * 64}))


def damage_shape(split) -> None:
    marker = json.loads((split.directory / "train.json").read_text())
    (split.directory / "train.json").write_text(json.dumps({**marker, "shape": [40, 6]}))


@pytest.mark.parametrize("damage", [damage_truncate, damage_marker, damage_key, damage_shape])
def test_a_damaged_cache_is_refused_by_the_reader_and_rebuilt_by_extraction(tmp_path, damage, caplog):
    model = CountingModel()
    key = key_of(model)
    damage(extract_features(model, loader(), tmp_path, key, "train", dtype="float32"))
    with pytest.raises(MRLError, match=r"damaged.*Delete that folder"):
        open_split(tmp_path, key, "train")
    with caplog.at_level(logging.WARNING, logger="mrl.data.feature_cache"):
        split = extract_features(model, loader(), tmp_path, key, "train", dtype="float32")
    assert "Rebuilding" in caplog.text and model.calls == 6
    assert open_split(tmp_path, key, "train") == split and split.features().shape == (40, 5)


def test_bad_loaders_and_models_are_refused(tmp_path):
    model = CountingModel()
    shuffled = DataLoader(loader().dataset, batch_size=8, shuffle=True)
    with pytest.raises(MRLError, match="neither shuffles nor drops"):
        extract_features(model, shuffled, tmp_path, "k", "train")
    with pytest.raises(MRLError, match=r"shape \(batch, features\)"):
        extract_features(nn.Identity(), loader(), tmp_path, "k", "train")
    with pytest.raises(MRLError, match="float16"):
        extract_features(model, loader(), tmp_path, "k", "train", dtype="int8")
    with pytest.raises(TypeError, match="JSON"):
        feature_cache_key(model, {"path": tmp_path}, PREPROCESSING)


def peak_bytes(tmp_path, n: int) -> int:
    model = CountingModel(dim=64)
    data = loader(n, batch_size=32)
    tracemalloc.start()
    try:
        extract_features(model, data, tmp_path / str(n), key_of(model), "train", dtype="float32")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    for n in (256, 4096):  # first-use allocations (lazy imports, caches) out of the way
        peak_bytes(tmp_path / "warm-up", n)
    small, large = peak_bytes(tmp_path, 256), peak_bytes(tmp_path, 4096)
    # holding the features would add (4096 - 256) * 64 * 4 bytes (about 1 MB); one batch is 8 KB
    assert large - small < 64 * 1024, (small, large)


def test_the_cached_loader_gives_seeded_random_batches_of_the_rows(tmp_path):
    model = CountingModel()
    split = extract_features(model, loader(), tmp_path, key_of(model), "train", dtype="float32")
    features, labels = np.asarray(split.features()), np.asarray(split.labels())

    def epoch(seed):
        return list(feature_loader(split, batch_size=16, seed=seed))

    batches = epoch(3)
    assert [len(b[0]) for b in batches] == [16, 16, 8]
    seen = np.concatenate([b[0].numpy() for b in batches])
    # every row once, in a shuffled order, each with its own label; within a batch in file order
    order = [int(np.flatnonzero((features == row).all(1))[0]) for row in seen]
    assert sorted(order) == list(range(40)) and order != list(range(40))
    assert all(order[i : i + 16] == sorted(order[i : i + 16]) for i in range(0, 40, 16))
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), labels[order])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, epoch(3), strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, epoch(4), strict=True))


def test_the_cached_loader_works_in_worker_processes(tmp_path):
    model = CountingModel()
    split = extract_features(model, loader(), tmp_path, key_of(model), "train", dtype="float32")
    rows = [b[0] for b in feature_loader(split, batch_size=10, shuffle=False, num_workers=2)]
    np.testing.assert_array_equal(torch.cat(rows).numpy(), split.features())


def test_the_dataset_pickles_without_its_mapped_arrays(tmp_path):
    """A loader's workers started by spawn get the dataset pickled: the paths, not the features."""
    model = CountingModel()
    split = extract_features(model, loader(400), tmp_path, key_of(model), "train", dtype="float32")
    dataset = CachedFeatures(split)
    first = dataset[3]
    data = pickle.dumps(dataset)
    assert len(data) < 2048  # 400 x 5 float32 features would be 8000 bytes
    copy = pickle.loads(data)
    assert torch.equal(copy[3][0], first[0]) and copy[3][1] == first[1]


def test_reading_batches_never_changes_the_cache_files(tmp_path):
    """The dataset maps the files copy-on-write (torch wants writable arrays): a batch written to in
    place changes that batch only, never the cache another job reads."""
    model = CountingModel()
    split = extract_features(model, loader(), tmp_path, key_of(model), "train", dtype="float16")
    before = {p: p.read_bytes() for p in (split.features_path, split.labels_path)}
    dataset = CachedFeatures(split)
    features, labels = dataset.__getitems__([5, 1, 7])  # rows in file order
    np.testing.assert_array_equal(
        features.numpy(), np.asarray(split.features())[[1, 5, 7]].astype(np.float32)
    )
    np.testing.assert_array_equal(labels.numpy(), np.asarray(split.labels())[[1, 5, 7]])
    features += 1
    labels += 1
    mapped, _ = dataset.tensors()
    mapped[0] += 1  # even a write through the mapping itself stays in this process
    assert {p: p.read_bytes() for p in before} == before
