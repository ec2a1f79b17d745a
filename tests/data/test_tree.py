"""ImageFolder trees: mrl-prepare-data, data=imagefolder and robustness sets accept and refuse the same
trees, with the same words (empty classes, classes missing from a split, broken links, images reached
twice through links), before any image is read."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from mrl.data.generate import write_image_tree
from mrl.data.image_folder import ImageFolderDataModule, list_image_folder
from mrl.data.prepare import check_root, prepare_shards
from mrl.errors import MRLError


def tree(root: Path) -> Path:
    return write_image_tree(root, classes=3, per_class={"train": 2, "val": 1}, size=(16, 12))


def empty_class(root: Path) -> None:
    shutil.rmtree(root / "train" / "class_0001")
    (root / "train" / "class_0001").mkdir()


def class_missing_from_val(root: Path) -> None:
    shutil.rmtree(root / "val" / "class_0001")


def linked_class_folder(root: Path) -> None:
    """A fourth class that is the first one again: its images twice, under two labels."""
    for split in ("train", "val"):
        os.symlink(root / split / "class_0000", root / split / "class_0003")


def val_linked_to_train(root: Path) -> None:
    shutil.rmtree(root / "val" / "class_0002")
    os.symlink(root / "train" / "class_0002", root / "val" / "class_0002")


def linked_file(root: Path) -> None:
    os.symlink(root / "train" / "class_0000" / "000000.jpg", root / "train" / "class_0001" / "copy.jpg")


def broken_link(root: Path) -> None:
    os.symlink(root / "gone.jpg", root / "train" / "class_0000" / "gone.jpg")


def link_loop(root: Path) -> None:
    os.symlink(root / "train" / "class_0000", root / "train" / "class_0000" / "again")


CASES = [
    (empty_class, ["class_0001", "hold no image files", "add images, or remove the class folder"]),
    (class_missing_from_val, ["The val split", "lacks train's class folder(s) class_0001", "add them"]),
    (linked_class_folder, ["same images twice", "val/class_0003 is", "val/class_0000", "remove it"]),
    (val_linked_to_train, ["same images twice", "val/class_0002 is", "train/class_0002", "two splits"]),
    (linked_file, ["same images twice", "class_0001/copy.jpg is", "class_0000/000000.jpg"]),
    (broken_link, ["1 broken symbolic link", "class_0000/gone.jpg", "Restore the targets or delete"]),
    (link_loop, ["same images twice", "class_0000/again is", "class_0000"]),
]


@pytest.mark.parametrize(("damage", "words"), CASES, ids=[c[0].__name__ for c in CASES])
def test_prepare_and_the_image_folder_refuse_the_same_trees_alike(tmp_path, damage, words):
    root = tree(tmp_path / "tree")
    damage(root)
    with pytest.raises(MRLError) as prepared:
        prepare_shards(str(root), str(tmp_path / "out"), num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"], "nothing written"
    with pytest.raises(MRLError) as folder:
        ImageFolderDataModule(root=str(root), num_workers=0)
    assert str(prepared.value) == str(folder.value)
    for text in words:
        assert text in str(folder.value), str(folder.value)


def test_a_robustness_set_is_held_to_the_same_checks(tmp_path):
    root = tree(tmp_path / "tree")
    linked_class_folder(root)
    with pytest.raises(MRLError, match="same images twice"):
        list_image_folder(root / "val")
    broken_link(root)
    with pytest.raises(MRLError, match="broken symbolic link"):
        list_image_folder(root / "train")


def test_links_to_images_elsewhere_are_fine_and_the_order_is_torchvisions(tmp_path):
    real = tree(tmp_path / "real")
    (real / "train" / "class_0001" / "sub").mkdir()
    shutil.copy(real / "train" / "class_0001" / "000000.jpg", real / "train" / "class_0001" / "sub" / "a.jpg")
    (real / "train" / "class_0002" / "notes.txt").write_text("not an image: ignored, as ImageFolder does")
    linked = tmp_path / "linked"
    for split in ("train", "val"):
        (linked / split).mkdir(parents=True)
        for folder in (real / split).iterdir():
            os.symlink(folder, linked / split / folder.name)  # every class folder a link out of the tree
    (tmp_path / "extra").mkdir()  # a linked file from outside the tree
    shutil.copy(real / "val" / "class_0000" / "000000.jpg", tmp_path / "extra" / "z.jpg")
    os.symlink(tmp_path / "extra" / "z.jpg", linked / "train" / "class_0001" / "sub" / "z.jpg")
    _, listings = check_root(str(linked))
    dm = ImageFolderDataModule(root=str(linked), num_workers=0)
    reference = ImageFolder(str(linked / "train"))
    assert listings["train"].samples == dm.listings["train"].samples == reference.samples
    assert dm.classes == tuple(reference.classes) and len(dm.listings["val"]) == 3


def test_a_folder_that_cannot_be_read_is_named_not_skipped(tmp_path, monkeypatch):
    """torchvision's os.walk skipped an unreadable folder without a word (root reads every folder here,
    so the refusal is simulated)."""
    root = tree(tmp_path / "tree")
    locked = root / "train" / "class_0001"
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(
        MRLError, match=r"Cannot list the folder .*class_0001 \(Permission denied\).*readable"
    ):
        ImageFolderDataModule(root=str(root), num_workers=0)
