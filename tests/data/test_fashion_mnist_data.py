"""Fashion-MNIST reading: both on-disk layouts, and a clear error for truncated files."""

import gzip
import shutil

import pytest

from mrl.data.fashion_mnist import FashionMNISTDataModule
from mrl.errors import MRLError


def test_reads_flat_and_torchvision_layouts(tiny_fashion_mnist, tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in tiny_fashion_mnist.iterdir():
        with gzip.open(f) as src, open(raw / f.name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)  # torchvision keeps them unzipped
    sizes = []
    for root in (tiny_fashion_mnist, tmp_path / "tv"):
        dm = FashionMNISTDataModule(data_dir=str(root), val_size=50)
        dm.setup()
        sizes.append([len(dm.datasets[s]) for s in ("train", "val", "test")])
    assert sizes == [[250, 50, 100], [250, 50, 100]]


def test_truncated_file_is_explained(tiny_fashion_mnist):
    path = tiny_fashion_mnist / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(MRLError, match=r"truncated or corrupt.*Delete it and get it again"):
        FashionMNISTDataModule(data_dir=str(tiny_fashion_mnist), val_size=50).setup()


def test_class_names_are_torchvisions_usable_as_folder_names():
    # written out in mrl (importing torchvision's datasets would slow `import mrl.data`), checked here
    from torchvision.datasets import FashionMNIST

    from mrl.data.fashion_mnist import CLASSES

    assert list(CLASSES) == [name.replace("/", "_") for name in FashionMNIST.classes]
