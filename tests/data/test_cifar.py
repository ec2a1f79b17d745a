"""CIFAR-10/100 datamodules on small generated data written in torchvision's on-disk format."""

import pytest
import torch

from mrl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from mrl.data.preprocess import random_crop
from mrl.errors import MRLError
from support import read_results, write_cifar


@pytest.mark.parametrize(
    ("cls", "kind", "classes"), [(CIFAR10DataModule, "cifar10", 10), (CIFAR100DataModule, "cifar100", 100)]
)
def test_reads_the_release_format(tmp_path, cls, kind, classes):
    write_cifar(tmp_path, kind)
    dm = cls(data_dir=str(tmp_path), val_size=10, batch_size=8)
    dm.setup()
    assert dm.num_classes == classes and dm.in_chans == 3 and dm.img_size == 32
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [90, 10, 20]
    x, y = next(iter(dm.val_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
    xn, _ = dm.on_after_batch_transfer((x, y), 0)
    expected = (x.float() / 255 - torch.tensor(cls.mean).view(1, 3, 1, 1)) / torch.tensor(cls.std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(xn, expected)


def test_missing_and_corrupt_files_are_explained(tmp_path):
    with pytest.raises(MRLError, match=r"CIFAR10 not found .*data.download=true"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(MRLError, match="corrupt"):
        CIFAR10DataModule(data_dir=str(tmp_path), val_size=10).setup()


def test_random_crop_matches_a_plain_loop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(1)
    out = random_crop(x, 2)
    torch.manual_seed(1)
    dy, dx = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        torch.testing.assert_close(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


@pytest.mark.slow
def test_trains_through_the_cli(run_main, tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    result = run_main(
        "mrl-train",
        "data=cifar10",
        f"data.data_dir={tmp_path / 'data'}",
        "data.val_size=20",
        "data.batch_size=16",
        "backbone.name=resnet18",
        "head.nesting=[8,64,512]",
        "trainer.max_epochs=1",
        "logger=none",
        "threads=1",
    )
    assert result.returncode == 0, result.output[-3000:]
    (job,) = result.run_dirs()
    assert 0.0 <= read_results(job)["test/acc@512"] <= 1.0
