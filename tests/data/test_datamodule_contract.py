"""Every ``data=<name>`` option builds a datamodule that gives every attribute of the
:class:`~mrl.data.base.MRLDataModule` contract a value of the declared type, and whose loaders and
``model_inputs`` serve images of the declared shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mrl.config_path import config_dir
from mrl.data.base import MRLDataModule
from mrl.resolvers import register_resolvers
from support import write_cifar

CONF = Path(config_dir())
OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
# What training, evaluation and deployment read from a datamodule.
ATTRIBUTES = {
    "num_classes": int,
    "classes": tuple,
    "in_chans": int,
    "img_size": int,
    "img_size_fixed": bool,
    "resizable": bool,
    "upsizable": bool,
    "eval_img_size": int,
    "mean": tuple,
    "std": tuple,
    "data_config": (dict, type(None)),
    "seed": int,
    "datasets": dict,
}
METHODS = (
    "resize",
    "configure_transforms",
    "split_loader",
    "model_inputs",
    "setup",
    "prepare_data",
    "image_file_transform",
    "loader_workers",
)
# a backbone's timm data config, unlike timm's ImageNet defaults the file-reading modules start from
BACKBONE_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


@pytest.fixture
def data_overrides(tiny_fashion_mnist, tiny_image_tree, tmp_path, request) -> dict[str, list[str]]:
    cifar = write_cifar(tmp_path / "cifar", "cifar10")
    write_cifar(cifar, "cifar100")
    small = ["data.batch_size=8", "data.eval_batch_size=8"]
    tree = [f"data.root={tiny_image_tree}", "data.num_workers=0", *small]
    overrides = {
        "fashion_mnist": [f"data.data_dir={tiny_fashion_mnist}", "data.val_size=50", *small],
        "cifar10": [f"data.data_dir={cifar}", "data.val_size=10", *small],
        "cifar100": [f"data.data_dir={cifar}", "data.val_size=10", *small],
        "imagefolder": tree,
        "imagenet_folder": tree,
        "synthetic": small,
    }
    if request.node.callspec.params["option"] in ("shards", "imagenet"):
        pytest.importorskip("litdata")
        shards = request.getfixturevalue("tiny_shards")
        for option in ("shards", "imagenet"):
            overrides[option] = [f"data.input_dir={shards}", "data.num_workers=0", *small]
    return overrides


def build(option: str, overrides: list[str]) -> Any:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", *overrides])
    return instantiate(cfg.data)


def check_declared(dm: Any) -> None:
    for name, kind in ATTRIBUTES.items():
        value = getattr(dm, name)  # no default: a missing attribute fails here
        assert isinstance(value, kind), (name, value)
    assert dm.num_classes > 0 and dm.in_chans > 0 and dm.img_size > 0 and dm.eval_img_size > 0
    assert len(dm.mean) == len(dm.std) == dm.in_chans
    # class names in label order, one per class, each a folder name (robustness sets are labelled by them)
    assert len(set(dm.classes)) == len(dm.classes) == dm.num_classes
    assert all(isinstance(c, str) and c and "/" not in c for c in dm.classes)
    assert all(isinstance(v, float) for v in (*dm.mean, *dm.std)) and all(v > 0 for v in dm.std)
    assert dm.upsizable == (dm.resizable and not dm.img_size_fixed)
    for method in METHODS:
        assert callable(getattr(dm, method)), method


def test_the_checked_attributes_are_the_declared_ones():
    declared = {
        name
        for klass in MRLDataModule.__mro__
        if klass.__module__ == "mrl.data.base"
        for name in (*vars(klass).get("__annotations__", {}), *vars(klass))
        if not name.startswith("_")
    }
    assert set(ATTRIBUTES) | set(METHODS) <= declared | {"setup", "prepare_data"}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_data_option_satisfies_the_contract(option, data_overrides):
    dm = build(option, data_overrides[option])
    assert isinstance(dm, MRLDataModule)
    check_declared(dm)
    dm.configure_transforms(BACKBONE_CONFIG)
    check_declared(dm)
    if dm.data_config is not None:  # read from files: preprocessing follows the backbone
        assert dm.mean == BACKBONE_CONFIG["mean"] and dm.std == BACKBONE_CONFIG["std"]
        assert dm.data_config["interpolation"] == "bicubic"
    dm.prepare_data()
    dm.setup("fit")
    assert {"train", "val", "test"} <= set(dm.datasets)
    assert all(len(dm.datasets[s]) > 0 for s in ("train", "val", "test"))

    x, y = dm.model_inputs(next(iter(dm.split_loader("val"))))
    size = dm.eval_img_size
    assert x.dtype == torch.float32 and x.shape[1:] == (dm.in_chans, size, size)
    assert y.dtype == torch.long and len(y) == len(x) and int(y.max()) < dm.num_classes

    if dm.resizable:
        dm.resize(2 * dm.img_size)
        assert dm.img_size == dm.eval_img_size
        x, _ = dm.model_inputs(next(iter(dm.split_loader("val"))))
        assert x.shape[-1] == dm.img_size
    else:
        with pytest.raises(NotImplementedError):
            dm.resize(2 * dm.img_size)


def test_synthetic_in_memory_satisfies_the_contract():
    dm = build("synthetic", ["data.in_memory=true", "data.train_size=16", "data.val_size=8"])
    check_declared(dm)
    dm.setup()
    x, _ = dm.model_inputs(next(iter(dm.split_loader("val"))))
    assert x.shape[1:] == (dm.in_chans, dm.img_size, dm.img_size)


@pytest.mark.parametrize("option", ["fashion_mnist", "cifar10"])
def test_in_memory_images_are_upsizable_until_the_user_sets_img_size(option, data_overrides):
    dm = build(option, data_overrides[option])
    assert dm.upsizable and not dm.img_size_fixed and dm.data_config is None
    chosen = build(option, [*data_overrides[option], "data.img_size=40"])
    assert chosen.img_size == chosen.eval_img_size == 40 and chosen.img_size_fixed and not chosen.upsizable
