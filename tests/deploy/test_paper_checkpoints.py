"""Checkpoints of the paper's repository (RAIVNLab/MRL) in mrl.load and mrl-eval.

The files are built here in that layout (no download): a torchvision ResNet-50 with FFCV's BlurPool
(strided convolutions wrapped as ``<layer>.conv`` beside a stored ``<layer>.blur_filter``) or without it,
its ``fc`` replaced by the MRL (``fc.nesting_classifier_<i>``), MRL-E (one ``nesting_classifier_0``, or the
older plain ``fc``) or FF-d (``fc`` of ``C x d``) classifier, saved as a plain state dict with or without
DDP's ``module.`` prefix. Every number is checked against a plain torchvision forward written below.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mrl
from mrl.errors import MRLError
from support import run_command

NUM_CLASSES = 4  # the classes of conftest's tiny_image_tree
NESTING = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
FF_DIM = 64


class ReferenceBlurConv(nn.Module):
    """The paper's BlurPool wrapper as its training code builds it: a stored binomial filter applied per
    channel (stride 1, zero padding 1) before the strided convolution ``conv``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        self.register_buffer("blur_filter", k.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def add_reference_blur(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, ReferenceBlurConv(child))
        else:
            add_reference_blur(child)


def reference_features(resnet: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward up to the average pool: the pooled (B, 2048) features."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    x = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
    return torch.flatten(resnet.avgpool(x), 1)


def reference_logits(kind: str, fc: dict[str, torch.Tensor], z: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per size, the paper's classifier on the first m features, from the file's fc tensors."""
    if kind == "mrl":
        return {
            m: z[:, :m] @ fc[f"fc.nesting_classifier_{i}.weight"].T + fc[f"fc.nesting_classifier_{i}.bias"]
            for i, m in enumerate(NESTING)
        }
    if kind == "mrl_e":
        w, b = (
            fc.get("fc.nesting_classifier_0.weight", fc.get("fc.weight")),
            fc.get("fc.nesting_classifier_0.bias", fc.get("fc.bias")),
        )
        return {m: z[:, :m] @ w[:, :m].T + b for m in NESTING}
    d = fc["fc.weight"].shape[1]
    return {d: z[:, :d] @ fc["fc.weight"].T + fc["fc.bias"]}


def _classifier(kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def linear(prefix: str, d: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": torch.randn(NUM_CLASSES, d, generator=generator) / d**0.5,
            f"{prefix}.bias": torch.randn(NUM_CLASSES, generator=generator),
        }

    if kind == "mrl":
        return {
            k: v for i, m in enumerate(NESTING) for k, v in linear(f"fc.nesting_classifier_{i}", m).items()
        }
    if kind == "mrl_e":
        return linear("fc.nesting_classifier_0", 2048)
    return linear("fc", FF_DIM if kind == "ff" else 2048)


class PaperFiles:
    """The module's files: ``paths[name]``, their fc tensors and the reference models they came from."""

    # name: (head kind as read, BlurPool, DDP prefix)
    LAYOUTS: ClassVar[dict[str, tuple[str, bool, bool]]] = {
        "mrl": ("mrl", True, True),
        "mrl_e": ("mrl_e", True, False),
        "ff": ("ff", False, True),
        "standard": ("standard", True, False),
    }

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        plain = torchvision.models.resnet50(weights=None)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # BatchNorm statistics and affine away from their init: all of it must map
            for module in plain.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
                    module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                    module.weight.copy_(torch.rand(module.num_features, generator=g) * 0.5 + 0.5)
                    module.bias.copy_(torch.randn(module.num_features, generator=g) * 0.1)
        plain.fc = nn.Identity()
        blurred = copy.deepcopy(plain)
        add_reference_blur(blurred)
        self.models = {False: plain.eval(), True: blurred.eval()}
        self.paths: dict[str, Path] = {}
        self.fc: dict[str, dict[str, torch.Tensor]] = {}
        for name, (kind, blur, ddp) in self.LAYOUTS.items():
            backbone = {k: v for k, v in self.models[blur].state_dict().items()}
            self.fc[name] = _classifier(kind, g)
            state = {**backbone, **self.fc[name]}
            if ddp:
                state = {f"module.{k}": v for k, v in state.items()}
            self.paths[name] = root / f"{name}.pt"
            torch.save(state, self.paths[name])
        # the paper's name of its MRL-E file, which is stored in the older notation (a plain full-width fc)
        self.paths["old_mrl_e"] = root / "r50_mrl1_e1_ff2048.pt"
        os.symlink(self.paths["standard"], self.paths["old_mrl_e"])
        self.fc["old_mrl_e"] = self.fc["standard"]

    def reference(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        kind, blur, _ = self.LAYOUTS.get(name, ("mrl_e", True, False))
        with torch.no_grad():
            z = reference_features(self.models[blur], x)
            return z, reference_logits(kind, self.fc[name], z)


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> PaperFiles:
    return PaperFiles(tmp_path_factory.mktemp("paper"))


def _inputs(size: int = 32, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize(
    ("name", "kind", "nesting"),
    [
        ("mrl", "mrl", NESTING),
        pytest.param("mrl_e", "mrl_e", NESTING, marks=pytest.mark.slow),
        ("ff", "ff", [FF_DIM]),
        pytest.param("standard", "standard", [2048], marks=pytest.mark.slow),
        pytest.param("old_mrl_e", "mrl_e", NESTING, marks=pytest.mark.slow),
    ],
)
def test_load_matches_the_reference_forward(paper, name, kind, nesting):
    model = mrl.load(paper.paths[name])
    assert model.spec.head == kind and model.nesting == nesting
    assert model.num_classes == NUM_CLASSES and model.embed_dim == 2048
    assert model.spec.blur_strided_convs == PaperFiles.LAYOUTS.get(name, (0, True))[1]
    x = _inputs()
    z_ref, logits_ref = paper.reference(name, x)
    with torch.no_grad():
        z = model(x)
        all_sizes = model.head(z)  # (G, B, C), the fused head mrl-eval uses
    assert_close(z, z_ref)
    assert sorted(logits_ref) == nesting
    for g, m in enumerate(nesting):
        assert_close(all_sizes[g], logits_ref[m])
    # the per-size API (one more forward each)
    m = nesting[len(nesting) // 2]
    assert_close(model.logits(x, dim=m), logits_ref[m])
    assert_close(model.embed(x, dim=m), F.normalize(z_ref[:, :m], dim=1))


def test_blurpool_changes_the_features(paper):
    """The check above would catch a missing blur: the two reference models differ."""
    x = _inputs()
    with torch.no_grad():
        plain, blurred = (reference_features(paper.models[b], x) for b in (False, True))
    assert (plain - blurred).abs().max() > 1e-2 * blurred.abs().max()


@pytest.mark.slow
def test_paper_head_names_the_ambiguous_full_width_fc(paper):
    as_mrl_e = mrl.load(paper.paths["standard"], paper_head="mrl_e")
    assert as_mrl_e.spec.head == "mrl_e" and as_mrl_e.nesting == NESTING
    x = _inputs(batch=2)
    _, logits_ref = paper.reference("old_mrl_e", x)
    assert_close(as_mrl_e.logits(x, dim=16), logits_ref[16])
    assert mrl.load(paper.paths["old_mrl_e"], paper_head="standard").nesting == [2048]
    with pytest.raises(MRLError, match=r"9 nesting classifiers.*not the requested 'mrl_e'"):
        mrl.load(paper.paths["mrl"], paper_head="mrl_e")
    with pytest.raises(MRLError, match=r"FF-64.*not the requested 'standard'"):
        mrl.load(paper.paths["ff"], paper_head="standard")


@pytest.mark.slow
def test_export_keeps_the_weights_and_the_papers_preprocessing(paper, tmp_path):
    from PIL import Image
    from torchvision import transforms

    model = mrl.load(paper.paths["mrl"])
    again = mrl.load(model.save(tmp_path / "model.safetensors"))
    x = _inputs(batch=2)
    z_ref, logits_ref = paper.reference("mrl", x)
    assert_close(again(x), z_ref)
    assert_close(again.logits(x, dim=32), logits_ref[32])
    assert again.spec.blur_strided_convs is True and again.spec == model.spec
    # the paper's evaluation transform (inference/pytorch_inference.py), on one odd-sized image
    paper_transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 411, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for loaded in (model, again):
        torch.testing.assert_close(loaded.preprocess(image)[0], paper_transform(image), rtol=0, atol=1e-5)


def test_layouts_that_fit_nothing_are_named(paper):
    """read_paper_state_dict on state dicts of other layouts: each MRLError says what was found and what
    was expected."""
    from mrl.models.paper_layout import read_paper_state_dict

    state = torch.load(paper.paths["mrl_e"], weights_only=True)
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = torch.zeros(NUM_CLASSES, 16)
    cases = {
        "other_model.pt": ({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, "blocks per"),
        "no_fc.pt": (backbone, "classifier keys none"),
        "gap.pt": (
            {**backbone, "fc.nesting_classifier_0.weight": w, "fc.nesting_classifier_2.weight": w},
            "expected fc.nesting_classifier_0",
        ),
        "not_nested.pt": (
            {
                **backbone,
                "fc.nesting_classifier_0.weight": torch.zeros(NUM_CLASSES, 64),
                "fc.nesting_classifier_1.weight": w,
            },
            r"in_features \[64, 16\]",
        ),
        "classes.pt": (
            {
                **backbone,
                "fc.nesting_classifier_0.weight": torch.zeros(NUM_CLASSES, 8),
                "fc.nesting_classifier_1.weight": torch.zeros(NUM_CLASSES + 1, 16),
            },
            "all the same C",
        ),
        "wide_fc.pt": ({**backbone, "fc.weight": torch.zeros(NUM_CLASSES, 4096)}, r"fc.weight \(4, 4096\)"),
        "blur.pt": (
            {**state, "layer2.0.conv2.blur_filter": torch.ones(128, 1, 3, 3)},
            "not FFCV's 3x3 binomial BlurPool filter",
        ),
    }
    for name, (bad_state, words) in cases.items():
        with pytest.raises(MRLError, match=words) as err:
            read_paper_state_dict(bad_state, name)
        assert "fc.nesting_classifier_<i>" in str(err.value), name  # says what it expected
    with pytest.raises(MRLError, match=r"paper_head='mrl_x'.*none of the head kinds"):
        read_paper_state_dict(state, "x.pt", "mrl_x")


@pytest.mark.slow
def test_weights_that_do_not_fit_timms_resnet_are_named(paper, tmp_path):
    """Keys of the layout, but a tensor timm's ResNet-50 does not have or of another shape: mrl.load and
    mrl-eval's loader name it (as the file names it) before any data is read."""
    from mrl.eval.model import load_for_eval

    state = torch.load(paper.paths["mrl_e"], weights_only=True)
    for name, bad, words in (
        ("conv1.pt", {"conv1.weight": torch.zeros(64, 3, 3, 3)}, r"shapes conv1.weight \(64, 3, 3, 3\)"),
        ("stray.pt", {"layer1.0.extra": torch.zeros(1)}, "unexpected layer1.0.extra"),
    ):
        path = tmp_path / name
        torch.save({**state, **bad}, path)
        for load in (mrl.load, lambda p: load_for_eval(p, {"_target_": "not.read.yet"})):
            with pytest.raises(MRLError, match=words) as err:
                load(path)
            assert "fc.nesting_classifier_<i>" in str(err.value)


def test_corrupt_and_missing_paper_files(paper, tmp_path):
    from mrl.eval.model import load_for_eval

    truncated = tmp_path / "r50_mrl1_e0_ff2048.pt"
    truncated.write_bytes(paper.paths["mrl"].read_bytes()[: 1 << 20])
    for load in (mrl.load, load_for_eval):
        with pytest.raises(MRLError, match="corrupt or truncated"):
            load(truncated)
        with pytest.raises(MRLError, match="does not exist"):
            load(tmp_path / "nope.pt")


def test_eval_needs_a_data_config_with_the_models_classes(paper, tmp_path):
    from mrl.data.generate import write_image_tree
    from mrl.eval.model import load_for_eval

    for data in (None, {}, {"root": "/data/imagenet"}):
        with pytest.raises(MRLError, match=r"no data config.*\+data=imagefolder data.root="):
            load_for_eval(paper.paths["mrl"], data)
    three = write_image_tree(tmp_path / "three", classes=3, per_class={"train": 1, "val": 1}, size=(40, 30))
    data = {"_target_": "mrl.data.image_folder.ImageFolderDataModule", "root": str(three), "num_workers": 0}
    with pytest.raises(MRLError, match=r"into 4 classes, but the data .* has 3 classes"):
        load_for_eval(paper.paths["mrl"], data)


@pytest.mark.slow
def test_eval_model_reads_the_data_with_the_papers_crop(paper, tiny_image_tree):
    """load_for_eval's module and datamodule: the paper's crop, and features equal to the reference on
    the datamodule's own model inputs."""
    from mrl.eval.model import load_for_eval

    data = {
        "_target_": "mrl.data.image_folder.ImageFolderDataModule",
        "root": str(tiny_image_tree),
        "img_size": 64,
        "num_workers": 0,
        "eval_batch_size": 4,
    }
    module, datamodule, config = load_for_eval(paper.paths["ff"], data)
    spec = datamodule.crop_spec(train=False)
    assert (spec.interpolation, spec.crop_pct, spec.size) == ("bilinear", 224 / 256, 64)
    assert config["head"] == {"kind": "ff", "bias": True, "dim": FF_DIM}
    assert config["backbone"]["name"] == "resnet50" and config["backbone"]["blur_strided_convs"] is False
    datamodule.setup(None)
    x, _ = datamodule.model_inputs(next(iter(datamodule.split_loader("val"))))
    z_ref, logits_ref = paper.reference("ff", x)
    with torch.no_grad():
        assert_close(module.backbone(x), z_ref)
        assert_close(module.head(module.backbone(x))[0], logits_ref[FF_DIM])


def test_paper_head_setting_reaches_the_loader(monkeypatch, tmp_path):
    """conf/eval.yaml's paper_head goes to load_for_eval (mrl-eval's only use of it)."""
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.eval import run

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x.pt", "paper_head=mrl_e", "+data=imagefolder"])
    assert cfg.data._target_.endswith("ImageFolderDataModule")
    seen = {}

    def spy(path, data, paper_head):
        seen.update(path=path, data=data, paper_head=paper_head)
        raise MRLError("stop")

    monkeypatch.setattr(run, "load_for_eval", spy)
    with pytest.raises(MRLError, match="stop"):
        run._context(cfg, tmp_path)
    assert seen["paper_head"] == "mrl_e" and seen["data"]["_target_"] == cfg.data._target_


@pytest.mark.slow
def test_mrl_eval_on_a_paper_checkpoint(paper, tiny_image_tree, tmp_path):
    """mrl-eval end to end on the MRL file (BlurPool, module. prefix) over a generated ImageFolder tree:
    per-size accuracy in report.json equals the paper's classifiers applied to the exported embeddings,
    and the exported model reloads with the file's weights."""
    args = [
        f"ckpt_path={paper.paths['mrl']}",
        "+data=imagefolder",
        f"data.root={tiny_image_tree}",
        "data.img_size=64",
        "data.num_workers=0",
        "logger=none",
        "threads=1",
        "adaptive_classification.num_splits=2",
        "adaptive_retrieval.hnsw=false",
        "adaptive_retrieval.shortlist_sizes=[8]",
        "adaptive_retrieval.shortlist_k=20",
        "adaptive_retrieval.funnel.shortlists=[40,30,20,15,10]",
        "retrieval.ks=[10]",
        "baselines.max_train=100",
        "baselines.max_iter=20",
        "baselines.interpolation=false",
    ]
    proc = run_command("mrl-eval", *args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (out,) = sorted((tmp_path / "logs" / "eval" / "runs").glob("*"))
    report = json.loads((out / "report.json").read_text())
    assert report["sizes"] == NESTING
    read_as = "RAIVNLab/MRL checkpoint: resnet50 MRL 8..2048 (9 sizes), 4 classes, BlurPool"
    assert read_as in proc.stdout + proc.stderr
    assert list(report["knn"]) == list(report["retrieval"]) == [str(m) for m in NESTING]
    queries = np.load(out / "test_embeddings.npy")
    labels = np.load(out / "test_labels.npy")
    assert queries.shape == (NUM_CLASSES * 4, 2048)
    logits = reference_logits("mrl", paper.fc["mrl"], torch.from_numpy(queries).float())
    for m in NESTING:
        expected = float((logits[m].argmax(1).numpy() == labels).mean())
        assert report["linear"][str(m)]["top1"] == pytest.approx(expected), m
    exported = mrl.load(out / "model.safetensors")
    assert exported.preprocessing.data_config["crop_pct"] == pytest.approx(224 / 256)
    x = _inputs(batch=2)
    z_ref, _ = paper.reference("mrl", x)
    assert_close(exported(x), z_ref)
