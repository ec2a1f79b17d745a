"""The deployment API (``mrl.load``, ``MatryoshkaModel``) and the one-file export mrl-eval writes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mrl
from mrl.deploy import FORMAT, FORMAT_VERSION, NONE, TIMM, UINT8, MatryoshkaModel
from mrl.errors import MRLError
from mrl.models.spec import ModelSpec, Preprocessing

NESTING = [2, 4, 8, 16]


def _spec(kind: str = UINT8, in_chans: int = 1, img_size: int = 28) -> ModelSpec:
    """A tiny model's description (random weights: no training needed)."""
    stats = {UINT8: (0.5,) * in_chans, NONE: None, TIMM: (0.5,) * in_chans}[kind]
    data_config = None
    if kind == TIMM:
        data_config = {
            "input_size": [in_chans, img_size, img_size],
            "interpolation": "bilinear",
            "mean": list(stats),
            "std": list(stats),
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
    return ModelSpec(
        backbone="test_byobnet",
        num_classes=5,
        in_chans=in_chans,
        img_size=img_size,
        projection_dim=16,
        nesting=tuple(NESTING),
        preprocessing=Preprocessing(kind, in_chans, img_size, stats, stats, data_config),
    )


def _untyped_document(spec: ModelSpec) -> dict:
    """The metadata an export of format version 1 (mrl before the typed description) stored for ``spec``."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "mrl_version": "0.1.0",
        "backbone": {
            "name": spec.backbone,
            "in_chans": spec.in_chans,
            "img_size": spec.img_size,
            "embed_dim": spec.projection_dim,
            "drop_path_rate": None,
            "model_kwargs": dict(spec.model_kwargs),
            "blur_strided_convs": False,
        },
        "embed_dim": spec.embed_dim,
        "head": {
            "kind": "mrl",
            "nesting": list(spec.nesting),
            "num_classes": 5,
            "efficient": False,
            "bias": True,
        },
        "preprocessing": spec.preprocessing.to_dict(),
        "data": {},
    }


@pytest.fixture(scope="module")
def tiny_model() -> MatryoshkaModel:
    torch.manual_seed(0)
    return MatryoshkaModel(_spec())


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> Path:
    return tiny_model.save(tmp_path_factory.mktemp("export") / "model.safetensors")


def _uint8_images(n: int = 4, in_chans: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (n, in_chans, size, size), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )


def test_export_round_trip_without_pickle(tiny_model, exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = mrl.load(exported)
    assert isinstance(loaded, mrl.MatryoshkaModel) and not loaded.training
    assert loaded.nesting == NESTING and loaded.embed_dim == 16 and loaded.num_classes == 5
    x = _uint8_images()
    for d in [1, 3, *NESTING]:  # any size, trained or not
        z = loaded.embed(x, dim=d)
        assert z.shape == (4, d)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(z, tiny_model.embed(x, dim=d))
    raw = loaded.embed(x, normalize=False)
    torch.testing.assert_close(loaded.embed(x, dim=4), torch.nn.functional.normalize(raw[:, :4], dim=1))
    for d in NESTING:
        torch.testing.assert_close(loaded.logits(x, dim=d), tiny_model.logits(x, dim=d))
        assert loaded.logits(x, dim=d).shape == (4, 5)
    torch.testing.assert_close(loaded.predict(x), tiny_model.logits(x, dim=16).argmax(-1))

    with safe_open(str(exported), framework="pt") as f:
        meta = json.loads(f.metadata()["mrl"])
        keys = set(f.keys())
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert ModelSpec.from_dict(meta["model"]) == loaded.spec == tiny_model.spec
    assert meta["model"]["nesting"] == NESTING and meta["model"]["num_classes"] == 5
    assert meta["model"]["backbone"] == "test_byobnet" and meta["model"]["embed_dim"] == 16
    assert (
        meta["model"]["preprocessing"]["kind"] == UINT8 and meta["model"]["preprocessing"]["img_size"] == 28
    )
    assert keys == set(tiny_model.state_dict()) and {"head.weight", "head.bias"} <= keys


def test_an_export_of_format_version_1_still_loads(tiny_model, exported, tmp_path):
    """Exports written before the typed model description keep loading, as the same model."""
    with safe_open(str(exported), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    old = tmp_path / "old.safetensors"
    save_file(
        tensors, str(old), metadata={"format": "pt", "mrl": json.dumps(_untyped_document(tiny_model.spec))}
    )
    loaded = mrl.load(old)
    assert loaded.spec == tiny_model.spec
    x = _uint8_images()
    torch.testing.assert_close(loaded.embed(x, dim=4), tiny_model.embed(x, dim=4), rtol=0, atol=0)
    torch.testing.assert_close(loaded.logits(x, dim=8), tiny_model.logits(x, dim=8), rtol=0, atol=0)
    with safe_open(str(loaded.save(tmp_path / "again.safetensors")), framework="pt") as f:
        assert json.loads(f.metadata()["mrl"])["format_version"] == FORMAT_VERSION  # saved in today's format


def test_preprocess_accepts_raw_images(tiny_model):
    from PIL import Image

    x = _uint8_images(3)
    batch = tiny_model.embed(x, dim=8)
    arrays = [img[0].numpy() for img in x]  # (H, W) grey arrays
    torch.testing.assert_close(tiny_model.embed(arrays, dim=8), batch)
    torch.testing.assert_close(tiny_model.embed([Image.fromarray(a) for a in arrays], dim=8), batch)
    torch.testing.assert_close(tiny_model.embed(np.stack(arrays)[..., None], dim=8), batch)  # (B, H, W, C)
    # float tensors are taken as already preprocessed
    pre = tiny_model.preprocess(x)
    assert pre.dtype == torch.float32 and pre.shape == (3, 1, 28, 28)
    torch.testing.assert_close(tiny_model.embed(pre, dim=8), batch)
    with pytest.raises(MRLError, match="1, 3 or 4 channels"):
        tiny_model.embed(np.zeros((28, 28, 2), dtype=np.uint8))


def test_a_single_image_gives_one_row(tiny_model):
    """One PIL image, one (H, W) uint8 array or tensor: a batch of one, the row the batch would give;
    colour images for a grey model (and grey ones for a colour model) are converted as PIL converts."""
    from PIL import Image

    x = _uint8_images(2)
    batch = tiny_model.embed(x, dim=8)
    grey = x[0, 0].numpy()
    for single in (Image.fromarray(grey), grey, torch.from_numpy(grey)):
        z = tiny_model.embed(single, dim=8)
        assert z.shape == (1, 8)
        torch.testing.assert_close(z[0], batch[0])
    rgb = np.repeat(grey[..., None], 3, axis=2)  # grey as RGB: its luminance is the grey image
    torch.testing.assert_close(tiny_model.embed(rgb, dim=8)[0], batch[0])
    torch.testing.assert_close(tiny_model.embed(Image.fromarray(rgb), dim=8)[0], batch[0])
    colour = MatryoshkaModel(_spec(TIMM, in_chans=3, img_size=32))
    assert colour.embed(grey, dim=4).shape == (1, 4)
    torch.testing.assert_close(colour.embed(grey, dim=4), colour.embed(rgb, dim=4))


def test_save_into_a_directory_and_load_on_a_missing_gpu_are_refused(tiny_model, exported, tmp_path):
    with pytest.raises(MRLError, match=r"is a directory.*model\.safetensors"):
        tiny_model.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MRLError, match="not a device"):
        mrl.load(exported, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MRLError, match=r"no CUDA GPU is available here.*device='cpu'"):
            mrl.load(exported, device="cuda")


def test_timm_preprocessing_takes_pil_images():
    from PIL import Image

    model = MatryoshkaModel(_spec(TIMM, in_chans=3, img_size=32))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    z = model.embed([image, image], dim=4)
    assert z.shape == (2, 4)
    torch.testing.assert_close(z[0], z[1])
    assert model.preprocess([image]).shape == (1, 3, 32, 32)


def test_bad_sizes(tiny_model):
    x = _uint8_images(2)
    for dim in (0, -1, 17):
        with pytest.raises(MRLError, match="between 1 and 16"):
            tiny_model.embed(x, dim=dim)
    with pytest.raises(MRLError, match="integer"):
        tiny_model.embed(x, dim=2.5)
    with pytest.raises(MRLError, match=r"trained at, \[2, 4, 8, 16\], not 3"):
        tiny_model.logits(x, dim=3)
    synthetic = MatryoshkaModel(_spec(NONE, in_chans=3, img_size=32))
    with pytest.raises(MRLError, match="float tensor"):
        synthetic.embed(_uint8_images(2, in_chans=3, size=32))
    with pytest.raises(MRLError, match=r"\(B, 3, H, W\)"):
        synthetic.embed(torch.zeros(2, 1, 32, 32))


def test_bad_files(tmp_path, exported):
    cases = []
    cases.append((tmp_path / "nope.safetensors", "does not exist"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(exported.read_bytes()[:-100])
    cases.append((truncated, "corrupt or truncated"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not a checkpoint")
    cases.append((garbage, "corrupt"))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    cases.append((plain, "not an mrl model export"))
    newer = tmp_path / "newer.safetensors"
    document = {"format": FORMAT, "format_version": 99, "model": _spec().to_dict()}
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"mrl": json.dumps(document)})
    cases.append((newer, "format version 99"))
    misfit = tmp_path / "misfit.safetensors"
    with safe_open(str(exported), framework="pt") as f:
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
        metadata = f.metadata()
    tensors["head.weight"] = torch.zeros(7, 30)
    del tensors["head.bias"]
    save_file(tensors, str(misfit), metadata=metadata)
    cases.append((misfit, r"do not fit .*missing head.bias.*head.weight \(7, 30\)"))
    sneaky = tmp_path / "sneaky.safetensors"
    spec = replace(_spec(), model_kwargs={"checkpoint_path": str(tmp_path / "evil.pth")})
    save_file(
        tensors,
        str(sneaky),
        metadata={"mrl": json.dumps({**json.loads(metadata["mrl"]), "model": spec.to_dict()})},
    )
    cases.append((sneaky, "only loads the weights stored with the model"))
    layer = tmp_path / "layer.safetensors"
    spec = replace(
        _spec(), model_kwargs={"act_layer": {"_target_": "hydra.utils.get_class", "path": "os.system"}}
    )
    save_file(
        tensors,
        str(layer),
        metadata={"mrl": json.dumps({**json.loads(metadata["mrl"]), "model": spec.to_dict()})},
    )
    cases.append((layer, "only resolves timm layer classes"))
    future = tmp_path / "future.safetensors"
    document = {**json.loads(metadata["mrl"]), "model": {**_spec().to_dict(), "version": 7}}
    save_file(tensors, str(future), metadata={"mrl": json.dumps(document)})
    cases.append((future, "description is of version 7"))
    damaged = tmp_path / "damaged.safetensors"
    document = {**json.loads(metadata["mrl"]), "model": {**_spec().to_dict(), "colour": "red"}}
    save_file(tensors, str(damaged), metadata={"mrl": json.dumps(document)})
    cases.append((damaged, r"metadata is incomplete .*unknown fields \['colour'\]"))
    for path, words in cases:
        with pytest.raises(MRLError, match=words):
            mrl.load(path)


def test_interrupted_export_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    import mrl.deploy.model

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    target = tmp_path / "model.safetensors"
    monkeypatch.setattr(mrl.deploy.model, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save(target)
    assert list(tmp_path.iterdir()) == []
    # an earlier export at the target survives a failed overwrite
    target.write_bytes(b"previous export")
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save(target)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"previous export"


def test_checkpoint_of_absent_image_folder_data(tmp_path):
    """A checkpoint loads without its data: the shape comes from the config, preprocessing from timm."""
    source = MatryoshkaModel(_spec(TIMM, in_chans=3, img_size=32))
    data = {"_target_": "mrl.data.image_folder.ImageFolderDataModule", "root": str(tmp_path / "gone")}
    config = {
        "data": {**data, "img_size": 32, "in_chans": 3},
        "backbone": {"_target_": "mrl.models.backbone.TimmBackbone", "name": "test_byobnet", "embed_dim": 16},
        "head": {"kind": "mrl", "nesting": NESTING, "bias": True},
    }
    state = {**source.state_dict(), "criterion.extra": torch.zeros(1)}  # non-model entries are dropped
    torch.save({"state_dict": state, "mrl_config": config, "mrl_nesting": NESTING}, tmp_path / "m.ckpt")
    loaded = mrl.load(tmp_path / "m.ckpt")
    assert loaded.preprocessing.kind == TIMM and loaded.preprocessing.img_size == 32
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.embed(x, dim=8), source.embed(x, dim=8))
    torch.testing.assert_close(loaded.logits(x, dim=4), source.logits(x, dim=4))

    # a larger evaluation resolution (ImageFolder's eval_img_size) is the preprocessing's size
    config["data"]["eval_img_size"] = 40
    torch.save({"state_dict": state, "mrl_config": config}, tmp_path / "fixres.ckpt")
    fixres = mrl.load(tmp_path / "fixres.ckpt")
    assert fixres.spec.img_size == 32 and fixres.preprocessing.img_size == 40
    assert fixres.preprocessing.data_config["input_size"] == [3, 40, 40]

    torch.save({"state_dict": state, "mrl_config": {**config, "data": data}}, tmp_path / "noshape.ckpt")
    with pytest.raises(MRLError, match="image shape the model was trained on is unknown"):
        mrl.load(tmp_path / "noshape.ckpt")


def test_import_mrl_stays_light():
    code = (
        "import sys, mrl\n"
        "from mrl import MatryoshkaLinear, MatryoshkaLoss\n"
        "heavy = ('lightning', 'timm', 'hydra', 'safetensors', 'mrl.deploy')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert mrl.load.__module__ == 'mrl.deploy.loading'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_load_trained_checkpoint_and_eval_export(run_cli, tiny_fashion_mnist, tmp_path):
    """mrl-train -> mrl-eval -> mrl.load of the checkpoint and of model.safetensors: the same embeddings
    as the exported ones, the same logits as the training module, without Hydra or the data."""
    from mrl.data.fashion_mnist import FashionMNISTDataModule
    from mrl.eval.knn import normalized_prefix
    from mrl.eval.model import load_for_eval

    train = run_cli(
        "mrl-train",
        "data=fashion_mnist",
        f"data.data_dir={tiny_fashion_mnist}",
        "data.val_size=50",
        "data.batch_size=50",
        "data.eval_batch_size=64",
        "trainer.max_epochs=1",
        "threads=1",
        "logger=none",
        f"head.nesting={NESTING}".replace(" ", ""),
        "backbone.embed_dim=16",
    )
    assert train.returncode == 0, train.output[-3000:]
    (job,) = train.run_dirs()
    ckpt = job / "checkpoints" / "last.ckpt"
    cheap = [f"methods.{m}=false" for m in ("knn", "retrieval", "adaptive_classification")]
    cheap += ["methods.adaptive_retrieval=false", "methods.baselines=false", "threads=1", "logger=none"]
    evaluation = run_cli("mrl-eval", f"ckpt_path={ckpt}", *cheap)
    assert evaluation.returncode == 0, evaluation.output[-3000:]
    (out,) = evaluation.run_dirs("eval")
    export = out / "model.safetensors"
    with safe_open(str(export), framework="pt") as f:
        meta = json.loads(f.metadata()["mrl"])
    assert meta["model"]["nesting"] == NESTING and meta["model"]["num_classes"] == 10
    preprocessing = meta["model"]["preprocessing"]
    assert preprocessing["kind"] == UINT8 and preprocessing["mean"] == pytest.approx([0.286])

    # the same test images, in the exported order, as raw uint8 and as the eval loader feeds them
    datamodule = FashionMNISTDataModule(data_dir=str(tiny_fashion_mnist), val_size=50)
    datamodule.setup()
    test = datamodule.datasets["test"]
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.stack([test[i][1] for i in range(len(test))])
    assert np.array_equal(np.load(out / "test_labels.npy"), labels.numpy())
    exported = np.load(out / "test_embeddings.npy")
    module, eval_datamodule, _ = load_for_eval(ckpt)
    x, _ = eval_datamodule.on_after_batch_transfer((images, labels), 0)
    with torch.inference_mode():
        module_logits = module.logits(x)

    tiny_fashion_mnist.rename(tmp_path / "data_gone")  # neither path needs the data
    probe = f"import sys, mrl; mrl.load({str(ckpt)!r}); mrl.load({str(export)!r})\n"
    probe += "assert 'hydra' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (ckpt, export):
        model = mrl.load(path)
        assert model.nesting == NESTING and model.preprocessing.kind == UINT8
        for g, d in enumerate(NESTING):
            want = torch.from_numpy(normalized_prefix(exported, d))
            torch.testing.assert_close(model.embed(images, dim=d), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.embed(x, dim=d), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.logits(images, dim=d), module_logits[g], atol=1e-5, rtol=1e-5)
