"""mrl-eval's robustness sets: class folders mapped to the training labels by name, logits restricted to
the covered classes, images preprocessed as the checkpoint's evaluation images, and the numbers in
report.json, robustness.png and W&B, checked against a plain computation written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from mrl.config_path import config_dir
from mrl.data.fashion_mnist import CLASSES as FASHION_CLASSES
from mrl.data.image_folder import image_files
from mrl.errors import MRLError
from mrl.eval.linear import linear_accuracy
from mrl.eval.robustness import class_labels, open_sets, robustness_sets
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.resolvers import register_resolvers
from support import CLIResult, run_command, wandb_inspect, wandb_run_dirs


def settings(sets: dict, restrict: bool = True, folders: str = "names") -> dict:
    """conf/eval.yaml's ``robustness`` section with ``sets``."""
    return {"restrict": restrict, "folders": folders, "sets": sets}


def configured(cfg) -> dict:
    """The sets of an eval config, as the robustness evaluator reads them (its section, resolved)."""
    return robustness_sets(OmegaConf.to_container(cfg.robustness, resolve=True), "")


# ---- mapping by name, masking -----------------------------------------------------------------


def test_folders_map_to_training_labels_by_name_not_by_sorted_order():
    # Fashion-MNIST's label order is not alphabetical: a subset's sorted folders are labels 9, 8, 1
    folders = sorted(["Trouser", "Bag", "Ankle boot"])
    assert class_labels(folders, FASHION_CLASSES, "s", Path("/s")) == [9, 8, 1]
    wnids = [f"n{i:08d}" for i in range(1000)]
    subset = sorted(wnids[i] for i in (7, 300, 999))
    assert class_labels(subset, wnids, "a", Path("/a")) == [7, 300, 999]
    with pytest.raises(MRLError, match=r"not classes of the training data: T-shirt/top, sneaker"):
        class_labels(["T-shirt/top", "sneaker"], FASHION_CLASSES, "s", Path("/s"))


@pytest.mark.parametrize("efficient", [False, True])
def test_covered_classes_top1_is_the_argmax_over_their_logits(efficient):
    torch.manual_seed(0)
    head = MatryoshkaLinear(16, 10, [2, 4, 8, 16], efficient=efficient)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(53, 16)).astype(np.float32)
    covered = [1, 4, 6, 9]
    y = rng.choice(covered, size=53)
    top1 = {d: acc["top1"] for d, acc in linear_accuracy(head, z, y, 7, covered).items()}  # short last chunk
    got = top1
    with torch.no_grad():
        logits = head(torch.from_numpy(z))  # (G, N, C)
    for g, d in enumerate(head.nesting):
        masked = np.full(logits.shape[1:], -np.inf, dtype=np.float32)
        masked[:, covered] = logits[g][:, covered].numpy()
        assert got[d] == pytest.approx((masked.argmax(1) == y).mean(), abs=1e-12)
    plain = {d: acc["top1"] for d, acc in linear_accuracy(head, z, y, 7).items()}
    for g, d in enumerate(head.nesting):
        assert plain[d] == pytest.approx((logits[g].argmax(-1).numpy() == y).mean(), abs=1e-12)
    # the mask matters here: an untrained head often prefers a class the set does not have
    assert any(got[d] > plain[d] for d in head.nesting)


# ---- settings and bad input -------------------------------------------------------------------


def test_settings_forms_restrict_and_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sets = robustness_sets(
        settings({"v2": str(a), "r": {"root": str(b), "restrict": False, "folders": "indices"}}), ""
    )
    assert sets == {
        "v2": {"root": a, "restrict": True, "folders": "names"},
        "r": {"root": b, "restrict": False, "folders": "indices"},
    }
    other = robustness_sets(settings({"v2": str(a)}, restrict=False, folders="indices"), "")
    assert other["v2"] == {"root": a, "restrict": False, "folders": "indices"}
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                "ckpt_path=x",
                f"+robustness.sets.v2={a}",
                f"+robustness.sets.r={{root:{b},restrict:false,folders:indices}}",
            ],
        )
    assert configured(cfg) == sets


def test_set_roots_are_resolved(tmp_path, monkeypatch):
    """A root written with an interpolation (an environment variable) is resolved before it is checked."""
    (tmp_path / "v2").mkdir()
    monkeypatch.setenv("MRL_TEST_DATA", str(tmp_path))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x", "+robustness.sets.v2=${oc.env:MRL_TEST_DATA}/v2"])
    assert configured(cfg)["v2"]["root"] == tmp_path / "v2"


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        ({"v2": "MISSING"}, ["robustness.sets.v2", "does not exist", "ImageFolder tree"]),
        ({"v2": "FILE"}, ["is not a folder"]),
        (
            {"v2": {"root": "ROOT", "mask": True}},
            ["unknown: mask", "{root: <dir>, restrict: true|false, folders: names|indices}"],
        ),
        ({"v2": {"restrict": True}}, ["give the set's folder"]),
        ({"v 2": "ROOT"}, ["letters, digits"]),
        ({"v2": {"root": "ROOT", "restrict": "yes"}}, ["robustness.sets.v2.restrict", "true or false"]),
        ({"v2": {"root": "ROOT", "folders": "wnids"}}, ["robustness.sets.v2.folders", "names or indices"]),
    ],
)
def test_bad_settings_are_refused(tmp_path, sets, words):
    (tmp_path / "file").write_text("x")
    paths = {"MISSING": str(tmp_path / "none"), "FILE": str(tmp_path / "file"), "ROOT": str(tmp_path)}

    def fill(v):
        return {k: fill(x) for k, x in v.items()} if isinstance(v, dict) else paths.get(v, v)

    with pytest.raises(MRLError) as err:
        robustness_sets(settings(fill(sets)), "")
    for word in words:
        assert word in str(err.value)


def _datamodule(option: str, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", *overrides])
    return instantiate(cfg.data)


def test_bad_trees_are_refused_before_any_work(tiny_image_tree, tmp_path):
    dm = _datamodule("imagefolder", f"data.root={tiny_image_tree}", "data.num_workers=0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MRLError, match="holds no class folders"):
        open_sets(settings({"e": str(empty)}), dm)
    (empty / "class_0001").mkdir()
    with pytest.raises(MRLError, match="class folders without image files"):
        open_sets(settings({"e": str(empty)}), dm)
    stray = tmp_path / "stray"
    shutil.copytree(tiny_image_tree / "val" / "class_0001", stray / "class_0001")
    shutil.copytree(tiny_image_tree / "val" / "class_0002", stray / "dog")
    with pytest.raises(MRLError, match=r"not classes of the training data: dog\. .*class_0000, class_0001"):
        open_sets(settings({"s": str(stray)}), dm)
    synthetic = _datamodule("synthetic", "data.num_classes=4")
    with pytest.raises(MRLError, match="generated tensors, not images"):
        open_sets(settings({"s": str(tiny_image_tree / "val")}), synthetic)


def test_folders_named_by_label_index(tiny_image_tree, tmp_path):
    """``folders: indices`` (ImageNet-V2's layout): folder ``3`` is label 3, whatever the names."""
    dm = _datamodule("imagefolder", f"data.root={tiny_image_tree}", "data.num_workers=0")
    numbered = tmp_path / "numbered"
    for label in (3, 1):
        shutil.copytree(tiny_image_tree / "val" / dm.classes[label], numbered / str(label))
    (s,) = open_sets(settings({"n": str(numbered)}, folders="indices"), dm)
    assert s.covered == (1, 3) and sorted(set(s.listing.targets)) == [1, 3]
    assert all(Path(p).parent.name == str(t) for p, t in s.listing.samples)
    (numbered / "1").rename(numbered / "01")
    with pytest.raises(MRLError, match=r"class folders 01 are not label indices"):
        open_sets(settings({"n": str(numbered)}, folders="indices"), dm)
    (numbered / "01").rename(numbered / "1")
    (numbered / "3").rename(numbered / "4")  # the tree has 4 classes: 0 ... 3
    with pytest.raises(MRLError, match=r"class folders 4 are not label indices 0 \.\.\. 3"):
        open_sets(settings({"n": str(numbered)}, folders="indices"), dm)


# ---- the checkpoint's own evaluation preprocessing -----------------------------------------------


def _inputs(dm, loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dm.model_inputs(batch) for batch in loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_image_files_become_the_eval_splits_own_model_inputs(tiny_image_tree, decode):
    """The tree's own val files, read as a robustness set, give exactly the val split's model inputs
    (decode=gpu decodes on the CPU here, through the same batched path)."""
    dm = _datamodule(
        "imagefolder",
        f"data.root={tiny_image_tree}",
        "data.num_workers=0",
        "data.img_size=32",
        "data.eval_batch_size=5",
        f"data.decode={decode}",
    )
    dm.configure_transforms(
        {"interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.9}
    )
    dm.setup()
    (s,) = open_sets(settings({"val": str(tiny_image_tree / "val")}), dm)
    x, y = _inputs(dm, dm.loader(image_files(dm, s.listing)))
    x_ref, y_ref = _inputs(dm, dm.split_loader("val"))
    assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


def test_rgb_files_for_a_grey_model_are_read_as_its_own_images(tiny_fashion_mnist, tmp_path):
    """Fashion-MNIST's test images saved as RGB PNGs in class-name folders, at 28 px and at 56 px: grey
    again, scaled to the native 28 px, then the data set's own resize (img_size=40) and normalisation."""
    dm = _datamodule(
        "fashion_mnist", f"data.data_dir={tiny_fashion_mnist}", "data.val_size=50", "data.img_size=40"
    )
    dm.setup()
    images, labels = dm.datasets["test"].tensors
    for side in (28, 56):
        root = tmp_path / f"set{side}"
        for i, (image, label) in enumerate(zip(images[:40], labels[:40], strict=True)):
            folder = root / FASHION_CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            rgb = Image.fromarray(image[0].numpy()).convert("RGB")
            rgb.resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        (s,) = open_sets(settings(restrict=False, sets={"f": str(root)}), dm)
        x, y = _inputs(dm, dm.loader(image_files(dm, s.listing)))
        files = [Path(p) for p, _ in s.listing.samples]
        # the plain way: grey pixels, antialiased down to 28 px, rounded to uint8, then the data's batch path
        grey = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L"))) for f in files])
        small = torch.nn.functional.interpolate(
            grey[:, None].float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False
        )
        stored = small.round().clamp(0, 255).to(torch.uint8)
        x_ref, y_ref = dm.model_inputs((stored, labels[[int(f.stem) for f in files]]))
        assert x.shape == (40, 1, 40, 40) and torch.equal(y, y_ref)
        if side == 28:  # the stored images themselves
            order = [int(f.stem) for f in files]
            assert torch.equal(x, dm.model_inputs((images[order], labels[order]))[0])
        # within one grey level (uint8 resize kernels round differently)
        assert float((x - x_ref).abs().max()) <= 1.01 / 255 / dm.std[0]


# ---- end to end ---------------------------------------------------------------------------------


def _cli(script: str, log_dir: Path, *args: str) -> CLIResult:
    return run_command(script, *args, cwd=log_dir.parent, log_dir=log_dir)


@pytest.fixture(scope="module")
def trained_on_a_tree(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MRL model (sizes 2..16) trained on a generated 5-class ImageFolder tree; (tree, checkpoint)."""
    from mrl.data.generate import write_image_tree

    tmp = tmp_path_factory.mktemp("robust")
    tree = write_image_tree(tmp / "tree", classes=5, per_class={"train": 16, "val": 6}, size=(48, 40))
    proc = _cli(
        "mrl-train",
        tmp / "logs",
        "data=imagefolder",
        f"data.root={tree}",
        "data.img_size=32",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "head.nesting=[2,4,8,16]",
        "backbone.embed_dim=16",
        "threads=1",
        "logger=none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (tmp / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    return tree, ckpt


def _reference(ckpt: Path, root: Path, covered: list[int] | None) -> dict[str, float]:
    """The plain computation: every file of ``root`` through the checkpoint's per-image eval transform and
    per-batch normalisation, the backbone and each size's classifier; argmax over ``covered`` (all when
    None) against the label its folder's name has among the training classes."""
    from mrl.eval.model import load_for_eval

    module, dm, _ = load_for_eval(ckpt)
    names = list(dm.classes)
    transform = dm.image_transform(train=False)
    files = sorted(root.glob("*/*.jpg"))
    x = torch.stack([transform(torch.from_numpy(np.fromfile(f, dtype=np.uint8))) for f in files])
    y = torch.tensor([names.index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = module.head(module(dm.batch_transform(x, train=False)))  # (G, N, C)
    keep = covered if covered is not None else list(range(len(names)))
    masked = torch.full_like(logits, -torch.inf)
    masked[..., keep] = logits[..., keep]
    hits = (masked.argmax(-1) == y).double().mean(1)
    return {str(d): float(hits[g]) for g, d in enumerate(module.nesting)}


@pytest.mark.slow
def test_eval_robustness_sets_end_to_end(trained_on_a_tree, tmp_path):
    tree, ckpt = trained_on_a_tree
    # a subset in another folder order: classes 4, 1, 3 under their names; read in sorted order
    # (class_0001, class_0003, class_0004), which a mapping by position would label 0, 1, 2
    subset = tmp_path / "subset"
    for name in ("class_0004", "class_0001", "class_0003"):
        shutil.copytree(tree / "val" / name, subset / name)
    numbered = tmp_path / "numbered"  # the same classes named by label (ImageNet-V2's layout)
    for label in (4, 1, 3):
        shutil.copytree(tree / "val" / f"class_{label:04d}", numbered / str(label))
    log_dir = tmp_path / "logs"
    proc = _cli(
        "mrl-eval",
        log_dir,
        f"ckpt_path={ckpt}",
        "threads=1",
        "methods.adaptive_retrieval=false",
        "methods.adaptive_classification=false",
        "methods.baselines=false",
        "retrieval.ks=[5]",
        "knn.k=5",
        f"+robustness.sets.full={tree / 'val'}",
        f"+robustness.sets.subset={subset}",
        f"+robustness.sets.open={{root:{subset},restrict:false}}",
        f"+robustness.sets.numbered={{root:{numbered},folders:indices}}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (log_dir / "eval" / "runs").glob("*")
    report = json.loads((out / "report.json").read_text())
    rob = report["robustness"]
    assert list(rob) == ["full", "subset", "open", "numbered"]
    assert {k: rob["full"][k] for k in ("images", "classes", "restricted")} == {
        "images": 30,
        "classes": 5,
        "restricted": False,
    }
    assert {k: rob["subset"][k] for k in ("images", "classes", "restricted")} == {
        "images": 18,
        "classes": 3,
        "restricted": True,
    }
    assert rob["open"]["restricted"] is False and rob["subset"]["root"] == str(subset)
    sizes = ["2", "4", "8", "16"]
    assert all(list(entry["top1"]) == sizes for entry in rob.values())
    # the val split read as a set is the query split itself (no test/ folder): the same top-1
    for d in sizes:
        assert rob["full"]["top1"][d] == pytest.approx(report["linear"][d]["top1"], abs=1e-9)
    assert rob["full"]["top1"] == pytest.approx(_reference(ckpt, tree / "val", None), abs=1e-9)
    assert rob["subset"]["top1"] == pytest.approx(_reference(ckpt, subset, [1, 3, 4]), abs=1e-9)
    assert rob["open"]["top1"] == pytest.approx(_reference(ckpt, subset, None), abs=1e-9)
    assert rob["numbered"]["top1"] == rob["subset"]["top1"] and rob["numbered"]["classes"] == 3
    labels = np.load(out / "robustness_subset_labels.npy")
    assert sorted(set(labels.tolist())) == [1, 3, 4] and np.bincount(labels).tolist() == [0, 6, 0, 6, 6]
    assert (out / "robustness.png").stat().st_size > 1000
    assert "robustness sets, linear top-1" in proc.stdout

    (run_dir,) = wandb_run_dirs(out)
    summary, history = wandb_inspect(run_dir)
    for name, entry in rob.items():
        for d in sizes:
            assert summary["summary"][f"eval/robustness/{name}/top1@{d}"] == pytest.approx(entry["top1"][d])
    logged = {k: v for row in history for k, v in row.items()}
    assert logged["eval/robustness._type"] == "table-file"
    assert logged["eval/robustness.nrows"] == 4 * 4 + 4  # every set and the query split, at every size
    assert "eval/robustness_png._type" in logged


@pytest.mark.slow
def test_eval_refuses_a_set_with_foreign_folders_before_any_work(trained_on_a_tree, run_main, tmp_path):
    tree, ckpt = trained_on_a_tree
    stray = tmp_path / "stray"
    shutil.copytree(tree / "val" / "class_0002", stray / "n01440764")
    log_dir = tmp_path / "logs"
    for arg, words in (
        (
            f"+robustness.sets.a={stray}",
            ["Robustness set 'a'", "n01440764", "named exactly as a training class"],
        ),
        (f"+robustness.sets.a={tmp_path / 'none'}", ["robustness.sets.a", "does not exist"]),
    ):
        proc = run_main("mrl-eval", f"ckpt_path={ckpt}", "threads=1", "logger=none", arg)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        for word in words:
            assert word in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
        assert not list(log_dir.rglob("*.npy")) and not list(log_dir.rglob("report.json"))


@pytest.mark.slow
def test_sets_are_exported_with_the_splits_in_one_pass_and_reused(
    trained_on_a_tree, tmp_path, monkeypatch, caplog
):
    """In-process: the robustness evaluator's sets are exported with the splits (the model goes back to
    the CPU once), its section comes from the registered loop, and a second call reuses every export."""
    from mrl.eval import run

    tree, ckpt = trained_on_a_tree
    moves: list[str] = []
    real_load = run.load_for_eval

    def load(*args, **kwargs):
        module, datamodule, train_cfg = real_load(*args, **kwargs)
        to_cpu = module.cpu
        module.cpu = lambda: moves.append("cpu") or to_cpu()
        return module, datamodule, train_cfg

    monkeypatch.setattr(run, "load_for_eval", load)
    off = [
        f"methods.{m}=false" for m in ("knn", "retrieval", "adaptive_classification", "adaptive_retrieval")
    ]
    off += ["methods.baselines=false", "methods.quantized=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                f"paths.output_dir={tmp_path / 'out'}",
                "logger=none",
                "threads=1",
                "export_model=false",
                *off,
                f"+robustness.sets.full={tree / 'val'}",
            ],
        )
    (tmp_path / "out").mkdir()
    first = run.evaluate(cfg)
    assert moves == ["cpu"]
    # the val split read as a set is the query split itself (no test/ folder): the same top-1
    linear = {d: v["top1"] for d, v in first["linear"].items()}
    assert first["robustness"]["full"]["top1"] == pytest.approx(linear, abs=1e-9)
    caplog.set_level("INFO", logger="mrl.eval.embeddings")
    again = run.evaluate(cfg)
    assert again == first
    reused = {r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("Reusing")}
    assert reused == {"train", "test", "robustness_full"}
