"""Fashion-MNIST and CIFAR serve the same splits and batches as before their shared base class: the
values in ``in_memory_reference.json`` were recorded with the separate modules of commit a8cd24f, on the
tiny generated data sets below. Items are compared as bytes, model inputs by a position-weighted sum per
image (a flip or a crop offset changes it). The splits and augmentation draw from torch's seeded CPU
generators: a torch release that changes those streams changes the values, not only a refactor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mrl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from mrl.data.fashion_mnist import FashionMNISTDataModule
from support import write_cifar

REFERENCE = Path(__file__).with_name("in_memory_reference.json")


class Training:
    """What the training-time augmentation reads off the trainer (a step into the first epoch)."""

    training, current_epoch, global_step, global_rank = True, 0, 3, 0


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def signature(x: torch.Tensor) -> list[float]:
    """One number per image that moves with flips and crops: the pixels weighted by row and column."""
    h, w = x.shape[-2:]
    weight = 1 + torch.arange(h)[:, None] / h + 2 * torch.arange(w)[None, :] / w
    return (x.double() * weight).sum(dim=(1, 2, 3)).tolist()


def observe(dm) -> dict:
    """The split (as item bytes), the first training and validation batches and their model inputs."""
    dm.setup()
    observed = {}
    for split in ("train", "val", "test"):
        items = [dm.datasets[split][i] for i in range(len(dm.datasets[split]))]
        observed[f"{split}_items"] = digest(
            torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        )
    x, y = next(iter(dm.train_dataloader()))
    observed["train_batch"] = digest(x, y)
    observed["train_labels"] = y.tolist()
    observed["train_inputs_eval"] = signature(dm.model_inputs((x, y))[0])
    dm.trainer = Training()
    observed["train_inputs_augmented"] = signature(dm.on_after_batch_transfer((x.clone(), y), 0)[0])
    dm.trainer = None
    x, y = next(iter(dm.val_dataloader()))
    observed["val_batch"] = digest(x, y)
    observed["val_inputs"] = signature(dm.model_inputs((x, y))[0])
    return observed


def cases(fashion_mnist: Path, cifar_root: Path) -> dict:
    """Named datamodules on the tiny data sets: several seeds, a resized Fashion-MNIST, a limited one."""
    common = {"batch_size": 16, "eval_batch_size": 16}
    fmnist = {"data_dir": str(fashion_mnist), "val_size": 50, **common}
    cifar = {"data_dir": str(cifar_root), "val_size": 10, **common}
    return {
        "fashion_mnist_seed0": lambda: FashionMNISTDataModule(**fmnist),
        "fashion_mnist_seed7": lambda: FashionMNISTDataModule(**fmnist, seed=7),
        "fashion_mnist_32px": lambda: FashionMNISTDataModule(**fmnist, img_size=32),
        "fashion_mnist_limited": lambda: FashionMNISTDataModule(**fmnist, limit_train=40, limit_eval=20),
        "fashion_mnist_no_augment": lambda: FashionMNISTDataModule(**fmnist, augment=False),
        "cifar10_seed0": lambda: CIFAR10DataModule(**cifar),
        "cifar10_seed3": lambda: CIFAR10DataModule(**cifar, seed=3),
        "cifar10_no_crop": lambda: CIFAR10DataModule(**cifar, crop_padding=0),
        "cifar100_seed0": lambda: CIFAR100DataModule(**cifar),
    }


@pytest.fixture
def data_roots(tiny_fashion_mnist, tmp_path) -> tuple[Path, Path]:
    write_cifar(tmp_path / "cifar", "cifar10")
    write_cifar(tmp_path / "cifar", "cifar100")
    return tiny_fashion_mnist, tmp_path / "cifar"


@pytest.mark.parametrize("name", sorted(json.loads(REFERENCE.read_text())))
def test_same_splits_and_batches_as_before(data_roots, name):
    expected = json.loads(REFERENCE.read_text())[name]
    observed = observe(cases(*data_roots)[name]())
    for key, value in expected.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert observed[key] == pytest.approx(value, rel=1e-5, abs=1e-3), key
        else:
            assert observed[key] == value, key
