"""The typed model description (ModelSpec): its dict form, the network it builds, the assembly of module
and datamodule from a config, and checkpoints with and without a stored spec (in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import mrl
from mrl.errors import MRLError
from mrl.models.build import build_model
from mrl.models.spec import TIMM, ModelSpec, Preprocessing, timm_preprocessing
from mrl.nn.nesting import default_nesting

BACKBONE = {"_target_": "mrl.models.backbone.TimmBackbone", "name": "test_byobnet", "embed_dim": 24}


def compose(tmp_path, *overrides: str):
    """The config ``mrl-train <overrides>`` composes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_a_spec_round_trips_through_json():
    data_config = {
        "interpolation": "bicubic",
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.2, 0.2),
        "crop_pct": 0.9,
    }
    spec = ModelSpec(
        backbone="resnet18",
        num_classes=7,
        img_size=64,
        projection_dim=32,
        model_kwargs={"aa_layer": {"_target_": "hydra.utils.get_class", "path": "timm.layers.BlurPool2d"}},
        head="mrl_e",
        nesting=(8, 16, 32),
        embed_dim=32,
        preprocessing=timm_preprocessing(data_config, 3, 72),
    )
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["version"] == ModelSpec.VERSION and stored["preprocessing"]["data_config"][
        "input_size"
    ] == [3, 72, 72]
    assert ModelSpec.from_dict(stored) == spec
    assert spec.preprocessing.mean == (0.5, 0.4, 0.3) and spec.preprocessing.kind == TIMM
    with pytest.raises(MRLError, match="version 2; this mrl reads version 1"):
        ModelSpec.from_dict({**stored, "version": 2})
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\], missing fields \['num_classes'\]"):
        ModelSpec.from_dict({k: v for k, v in {**stored, "depth": 3}.items() if k != "num_classes"})
    with pytest.raises(ValueError, match="preprocessing kind 'jpeg'"):
        Preprocessing.from_dict({**stored["preprocessing"], "kind": "jpeg"})


@pytest.mark.parametrize(
    ("head", "sizes"),
    [
        ({"kind": "mrl", "nesting": None, "min_size": 4}, default_nesting(24, 4)),
        ({"kind": "mrl_e", "nesting": [2, 8, 24], "weights": [1, 1, 2]}, [2, 8, 24]),
        ({"kind": "ff", "dim": 12, "nesting": None}, [12]),
        ({"kind": "standard"}, [24]),
    ],
)
def test_a_config_spec_builds_the_model_and_the_built_spec_rebuilds_it(head, sizes):
    spec = ModelSpec.from_config(BACKBONE, head, num_classes=5, in_chans=3, img_size=32)
    assert spec.embed_dim is None and spec.preprocessing is None  # known once built
    torch.manual_seed(0)
    backbone, built_head, built = build_model(spec)
    assert built.nesting == tuple(sizes) == tuple(built_head.nesting) and built.embed_dim == 24
    assert built_head.efficient == (head["kind"] == "mrl_e") and built_head.num_classes == 5
    # the built description, stored and read back, builds the same network; so does its config form
    again = build_model(ModelSpec.from_dict(json.loads(json.dumps(built.to_dict()))))
    assert again.spec == built
    state = {**backbone.state_dict(), **{f"head.{k}": v for k, v in built_head.state_dict().items()}}
    rebuilt = {**again.backbone.state_dict(), **{f"head.{k}": v for k, v in again.head.state_dict().items()}}
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}
    config = built.to_config()
    assert build_model(ModelSpec.from_config(config["backbone"], config["head"], 5, 3, 32)).spec == built


def test_a_rebuilt_model_of_another_embedding_size_is_refused():
    spec = ModelSpec.from_config(BACKBONE, {"kind": "mrl"}, 5, 3, 32)
    _, _, built = build_model(spec)
    with pytest.raises(MRLError, match="gives 24-d embeddings here but the model was saved with 48-d"):
        build_model(replace(built, embed_dim=48))


def test_backbone_settings_that_describe_no_timm_model_are_refused():
    with pytest.raises(MRLError, match=r"backbone\._target_=my\.Backbone: mrl builds its backbones as"):
        ModelSpec.from_config({**BACKBONE, "_target_": "my.Backbone"}, {}, 5, 3, 32)
    with pytest.raises(MRLError, match=r"backbone\.depth is not a backbone setting"):
        ModelSpec.from_config({**BACKBONE, "depth": 3}, {}, 5, 3, 32)
    layer = {"act_layer": {"_target_": "hydra.utils.get_class", "path": "torch.nn.GELU"}}
    with pytest.raises(MRLError, match="only resolves timm layer classes"):
        build_model(ModelSpec.from_config({**BACKBONE, "model_kwargs": layer}, {}, 5, 3, 32))


def test_building_a_model_imports_no_hydra():
    """mrl.load needs neither Hydra nor the training config: the builder and the deploy package stay
    free of it."""
    code = "import sys, mrl.deploy, mrl.models.build; assert 'hydra' not in sys.modules, 'hydra'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_assemble_configures_the_data_once_for_an_upsized_model(tmp_path, tiny_fashion_mnist):
    """Fashion-MNIST's 28 px are too small for test_convnext: the assembly builds it for 32 px, serves
    the images at that size, and the module's spec says so, preprocessing included."""
    from mrl.training.assemble import assemble

    cfg = compose(
        tmp_path, "data=fashion_mnist", f"data.data_dir={tiny_fashion_mnist}", "backbone.name=test_convnext"
    )
    module, datamodule = assemble(cfg)
    spec = module.spec
    assert datamodule.img_size == spec.img_size == 32 and module.backbone.img_size == 32
    assert spec.preprocessing == Preprocessing(
        "uint8_normalize", 1, 32, spec.preprocessing.mean, spec.preprocessing.std
    )
    assert spec.preprocessing.mean == pytest.approx(datamodule.mean) and spec.in_chans == 1
    assert list(spec.nesting) == module.nesting and spec.num_classes == 10


def test_checkpoints_store_the_spec_and_those_written_before_it_still_load(tmp_path):
    """A checkpoint holds the module's spec beside its config; one without it (as mrl wrote them before
    the spec existed) is rebuilt from its config into the same model."""
    from mrl.training.assemble import assemble
    from mrl.training.checkpoints import SPEC_KEY

    torch.manual_seed(0)
    module, datamodule = assemble(compose(tmp_path, "debug=tiny", "head=mrl_e", "backbone.embed_dim=32"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert (
        ModelSpec.from_dict(checkpoint[SPEC_KEY]) == module.spec and checkpoint["mrl_config"] == module.config
    )
    torch.save(checkpoint, tmp_path / "new.ckpt")
    torch.save({k: v for k, v in checkpoint.items() if k != SPEC_KEY}, tmp_path / "old.ckpt")
    new, old = mrl.load(tmp_path / "new.ckpt"), mrl.load(tmp_path / "old.ckpt")
    assert new.spec == old.spec == module.spec and new.spec.head == "mrl_e" and new.embed_dim == 32
    datamodule.setup(None)
    x, _ = datamodule.model_inputs(next(iter(datamodule.split_loader("val"))))
    module.eval()
    with torch.inference_mode():
        logits = module.logits(x)
    for model in (new, old):
        torch.testing.assert_close(model.embed(x, normalize=False), module(x), rtol=0, atol=0)
        # one size's classifier alone, where the module's head computes all sizes in one product
        torch.testing.assert_close(model.logits(x, dim=8), logits[module.nesting.index(8)])
    torch.testing.assert_close(new.logits(x, dim=8), old.logits(x, dim=8), rtol=0, atol=0)
