"""``mrl-train source=<model> head=...``: heads trained on a frozen source's cached features.

End to end (slow): one trained source, then ONE multirun of every head kind on it (W&B offline, each job
evaluated after training), read by the tests below: results, checkpoints and their model description,
W&B's records, the one extraction the five jobs share, ``mrl-eval``'s report, ``mrl.load`` embedding raw
images through the whole chain (checked against the source and the projection's weights written out by
hand) and ``mrl-report``'s quality-vs-bytes comparison. Then each other kind of source (an export, a
checkpoint of the paper's repository, a timm backbone with a weights file) and a resumed post-hoc run.

Bad input (fast, in process): every refusal is one paragraph and a non-zero exit before any feature is
computed or any result written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mrl
from mrl.eval.locations import find_evaluations
from mrl.models.spec import FeatureHead
from support import (
    TINY,
    compose_train,
    read_results,
    run_command,
    wandb_inspect,
    wandb_run_dirs,
    write_cifar,
    write_paper_checkpoint,
    write_untrained_export,
)

# every head kind on the same source; ff trains its one size head.dim=8 (conf/head/ff.yaml)
SIZES = {"mrl": [4, 16, 64], "mrl_e": [4, 16, 64], "ff": [8], "csr": [4, 16, 64], "adaptor": [4, 16, 64]}
FEATURE_HEADS = {"mrl": "projection", "mrl_e": "projection", "ff": "projection", "csr": "csr"}
SOURCE_WIDTH = 256  # test_byobnet's pooled features
CHEAP_EVAL = (
    "evaluate={methods: {adaptive_classification: false, adaptive_retrieval: false}, "
    "baselines: {interpolation: false, max_iter: 20, sizes: [1, 2, 4, 8]}, "
    "knn: {k: 3}, retrieval: {ks: [10]}}"
)


def kind_of(job: Path) -> str:
    return torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["mrl_model"]["head"]


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory) -> Path:
    """An end-to-end tiny run: the model the heads below start from."""
    tmp = tmp_path_factory.mktemp("source")
    result = run_command("mrl-train", *TINY, "logger=none", "test=false", "hydra.run.dir=source", cwd=tmp)
    assert result.returncode == 0, result.output[-3000:]
    return tmp / "source" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def heads(source_ckpt, tmp_path_factory) -> dict[str, Path]:
    """One multirun of every head kind on the frozen source, each job evaluated: its job dirs by kind."""
    tmp = tmp_path_factory.mktemp("heads")
    args = [
        "-m",
        *TINY,
        f"source={source_ckpt}",
        "head=mrl,mrl_e,ff,csr,adaptor",
        "head.nesting=[4,16,64]",
        CHEAP_EVAL,
    ]
    result = run_command("mrl-train", *args, cwd=tmp, timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    return {kind_of(job): job for job in result.sweep_job_dirs()}


def state_of(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_every_head_trains_on_the_frozen_source_in_one_multirun(heads, source_ckpt):
    assert sorted(heads) == sorted(SIZES)
    source = {k: v for k, v in state_of(source_ckpt).items() if k.startswith("backbone.model.")}
    for kind, job in heads.items():
        results, sizes = read_results(job), SIZES[kind]
        for stage in ("val", "test"):
            assert {k for k in results if k.startswith(f"{stage}/acc@")} == {
                f"{stage}/acc@{d}" for d in sizes
            }
            assert all(0.0 <= results[f"{stage}/acc@{d}"] <= 1.0 for d in sizes)
        assert "val/loss" in results and "train/loss" in results
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["mrl_nesting"] == sizes
        feature_head = ckpt["mrl_model"]["feature_head"]
        assert feature_head["kind"] == FEATURE_HEADS.get(kind, kind)
        assert feature_head["in_features"] == SOURCE_WIDTH
        assert ckpt["mrl_model"]["backbone"] == "test_byobnet" and ckpt["mrl_config"]["source"] == str(
            source_ckpt
        )
        # the source came through training untouched: its weights and BatchNorm statistics, bit for bit
        for name, value in source.items():
            assert torch.equal(ckpt["state_dict"]["backbone.source.model." + name[15:]], value), name
    assert torch.load(heads["csr"] / "checkpoints" / "last.ckpt", weights_only=True)["mrl_model"][
        "feature_head"
    ]["settings"]["expansion"] == pytest.approx(4)


@pytest.mark.slow
def test_one_extraction_serves_every_job(heads):
    jobs = sorted(heads.values(), key=lambda job: int(job.name))
    (cache,) = (jobs[0].parents[3] / "feature_cache").iterdir()  # <log dir>/feature_cache/<key>
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{split}{suffix}"
        for split in ("train", "val", "test")
        for suffix in (".npy", ".labels.npy", ".json")
    )
    written = max(p.stat().st_mtime_ns for p in cache.iterdir())
    for job in jobs[1:]:  # Hydra writes each job's config as the job starts: after the features
        assert written < (job / ".hydra" / "config.yaml").stat().st_mtime_ns, job.name


@pytest.mark.slow
def test_heads_checkpoint_at_each_epoch_end_and_end_to_end_runs_every_50_steps(heads):
    """A head's steps take milliseconds and its checkpoints hold the source's weights: no periodic
    checkpoint by default (0: each epoch's only), unless asked for; end-to-end runs keep theirs."""
    assert compose_train().checkpoint_every_n_steps == 50
    assert compose_train("source=backbone").checkpoint_every_n_steps == 0
    assert compose_train("source=backbone", "checkpoint_every_n_steps=7").checkpoint_every_n_steps == 7
    for job in heads.values():
        assert "checkpoint_every_n_steps: 0\n" in (job / "resolved_config.yaml").read_text()


def test_wandb_records_each_post_hoc_run(heads, source_ckpt):
    for kind, job in heads.items():
        (run,) = wandb_run_dirs(job)
        summary, history = wandb_inspect(run)
        assert summary["config"]["source"] == str(source_ckpt)
        for d in SIZES[kind]:
            assert any(f"val/acc@{d}" in row for row in history), (kind, d)
            assert summary["summary"][f"test/acc@{d}"] == pytest.approx(read_results(job)[f"test/acc@{d}"])
        logged = {key for row in history for key in row}
        if kind in ("csr", "adaptor"):  # their own per-size losses beside the probe's cross-entropy
            assert {f"train/{kind}_loss", *(f"train/{kind}_loss@{d}" for d in SIZES[kind])} <= logged, kind
        assert ("train/dead_fraction_step" in logged or "train/dead_fraction" in logged) == (kind == "csr")


@pytest.mark.slow
def test_evaluation_and_mrl_load_run_images_through_the_whole_chain(heads, source_ckpt):
    """mrl.load of the post-hoc checkpoint and of the export its evaluation wrote: raw images -> the
    source's preprocessing and pooled features -> the projection, as written out here from the weights."""
    job = heads["mrl"]
    (report_path,) = find_evaluations(job)
    report = json.loads(report_path.read_text())
    assert report["sizes"] == SIZES["mrl"] and set(report["linear"]) == {"4", "16", "64"}
    assert report["bytes"]["embedding"]["float32"]["16"] == 16 * 4
    source = mrl.load(source_ckpt)
    state = state_of(job / "checkpoints" / "last.ckpt")
    weight, bias = state["backbone.feature_head.net.weight"], state["backbone.feature_head.net.bias"]
    images = torch.randint(
        0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    z = source.embed(images, normalize=False) @ weight.T + bias  # its pooled features (no projection)
    for path in (job / "checkpoints" / "last.ckpt", report_path.parent / "model.safetensors"):
        model = mrl.load(path)
        assert model.preprocessing == source.preprocessing and model.nesting == SIZES["mrl"]
        for d in SIZES["mrl"]:
            torch.testing.assert_close(
                model.embed(images, dim=d), F.normalize(z[:, :d]), rtol=1e-4, atol=1e-5
            )
    for kind in ("csr", "adaptor"):
        assert json.loads(find_evaluations(heads[kind])[0].read_text())["sizes"] == SIZES[kind]


@pytest.mark.slow
def test_mrl_report_draws_quality_against_bytes(heads):
    sweep = next(iter(heads.values())).parent
    report = run_command("mrl-report", str(sweep), cwd=sweep.parents[3])
    assert report.returncode == 0, report.output[-3000:]
    out = sweep / "report"
    comparison = json.loads((out / "comparison.json").read_text())
    # each head is its own method, named by the run it was trained on (source_ckpt's run dir "source")
    methods = {f"{kind} [source=source]" for kind in SIZES}
    assert set(comparison["tables"]["top1"]) == methods
    lines = comparison["quality_vs_bytes"]["tables"]["map@10"]
    assert {line.split(" (")[0] for line in lines} == methods
    mrl_report = json.loads(find_evaluations(heads["mrl"])[0].read_text())
    stored = mrl_report["bytes"]["embedding"]["int8"]["16"]
    assert lines["mrl [source=source] (int8)"][str(stored)]["mean"] == pytest.approx(
        100 * mrl_report["quantized"]["int8"]["16"]["map@10"]
    )
    assert (out / "quality_vs_bytes.png").stat().st_size > 10_000
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


# ---- the other kinds of source -----------------------------------------------------------------------


def job_dir(result) -> Path:
    (job,) = result.run_dirs()
    return job


@pytest.mark.slow
def test_an_export_of_the_source_trains_from_the_same_cache(run_main, heads, source_ckpt, tmp_path):
    """model.safetensors holds the same weights and preprocessing as the checkpoint: the features the
    multirun cached are found, not computed again."""
    export = mrl.load(source_ckpt).save(tmp_path / "model.safetensors")
    cache = shutil.copytree(next(iter(heads.values())).parents[3] / "feature_cache", tmp_path / "cache")
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    args = [f"source={export}", "head=csr", "head.nesting=[8,32]", "head.expansion=2"]
    result = run_main("mrl-train", *TINY, "logger=none", *args, f"features.cache_dir={cache}")
    assert result.returncode == 0, result.output[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before
    job = job_dir(result)
    assert {k for k in read_results(job) if k.startswith("test/acc@")} == {"test/acc@8", "test/acc@32"}
    spec = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["mrl_model"]
    assert spec["feature_head"]["kind"] == "csr" and spec["feature_head"]["settings"]["expansion"] == 2


@pytest.mark.slow
def test_a_checkpoint_of_the_papers_repository_as_source(run_main, tiny_image_tree, tmp_path):
    paper = write_paper_checkpoint(tmp_path / "r18_mrl.pt", num_classes=4)
    result = run_main(
        "mrl-train",
        "logger=none",
        "threads=1",
        "trainer.max_epochs=1",
        f"source={paper}",
        "data=imagefolder",
        f"data.root={tiny_image_tree}",
        "data.num_workers=0",
        "data.batch_size=16",
        "head=mrl_e",
        "head.nesting=[8,64,512]",
    )
    assert result.returncode == 0, result.output[-3000:]
    job = job_dir(result)
    assert {k for k in read_results(job) if k.startswith("val/acc@")} == {
        "val/acc@8",
        "val/acc@64",
        "val/acc@512",
    }
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    spec = ckpt["mrl_model"]
    assert spec["backbone"] == "resnet18" and spec["feature_head"]["in_features"] == 512
    assert spec["preprocessing"]["data_config"]["crop_pct"] == pytest.approx(224 / 256)  # the paper's crop
    weights = torch.load(paper, weights_only=True)
    for name in ("conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(ckpt["state_dict"][f"backbone.source.model.{name}"], weights[f"module.{name}"])


@pytest.mark.slow
def test_a_timm_backbone_with_a_weights_file_as_source(run_main, tmp_path):
    import timm

    torch.manual_seed(3)
    weights = timm.create_model("test_byobnet", num_classes=0).state_dict()
    save_file(weights, str(tmp_path / "test_byobnet.safetensors"))
    result = run_main(
        "mrl-train",
        *TINY,
        "logger=none",
        "source=backbone",
        "backbone.name=test_byobnet",
        f"backbone.pretrained_path={tmp_path / 'test_byobnet.safetensors'}",
        "features.projection_dim=32",
        "features.hidden=64",
        "head.nesting=[4,16,32]",
    )
    assert result.returncode == 0, result.output[-3000:]
    ckpt = torch.load(job_dir(result) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["mrl_model"]["feature_head"] == {
        "kind": "projection",
        "in_features": SOURCE_WIDTH,
        "settings": {"dim": 32, "hidden": 64},
    }
    assert ckpt["state_dict"]["backbone.feature_head.net.2.weight"].shape == (32, 64)  # an MLP to 32
    for name, value in weights.items():
        assert torch.equal(ckpt["state_dict"][f"backbone.source.model.{name}"], value), name
    untrained = run_main("mrl-train", *TINY, "logger=none", "source=backbone", "head.nesting=[4,16]")
    assert untrained.returncode == 0 and "features are those of an untrained network" in untrained.output


@pytest.mark.slow
def test_a_post_hoc_run_resumes_on_its_cached_features(run_main, source_ckpt, tmp_path):
    first = run_main(
        "mrl-train", *TINY, "logger=none", f"source={source_ckpt}", "head=adaptor", "head.nesting=[4,16]"
    )
    assert first.returncode == 0, first.output[-3000:]
    job = job_dir(first)
    cache = tmp_path / "logs" / "feature_cache"
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    before = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = run_main("mrl-train", f"resume={job}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.output[-3000:]
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == before["epoch"] + 1 and ckpt["mrl_model"] == before["mrl_model"]
    head = "backbone.feature_head.residual.0.weight"
    assert not torch.equal(ckpt["state_dict"][head], before["state_dict"][head])  # it trained on
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == written  # on the same cached features
    assert {"test/acc@4", "test/acc@16"} <= set(read_results(job))


# ---- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Files given as source=: an untrained model of the tiny synthetic data (32 px, 10 classes, 256
    features), one of CIFAR-10 (the same shape, another normalisation), a head trained on a source, and
    files that are no model."""
    tmp = tmp_path_factory.mktemp("sources")
    model = write_untrained_export(tmp / "model.safetensors", *TINY)
    cifar = write_cifar(tmp / "cifar", "cifar10")
    spec = replace(mrl.load(model).spec, feature_head=FeatureHead("projection", SOURCE_WIDTH, {}))
    (tmp / "text.ckpt").write_text("not a model\n")
    save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    return {
        "model": model,
        "cifar": write_untrained_export(tmp / "cifar.safetensors", "data=cifar10", f"data.data_dir={cifar}"),
        "posthoc": mrl.MatryoshkaModel(spec).save(tmp / "posthoc.safetensors"),
        "text": tmp / "text.ckpt",
        "weights": tmp / "weights.safetensors",
        "directory": tmp / "run",
        "missing": tmp / "none.ckpt",
    }


BAD = [  # (source, overrides, what the message says)
    (
        "model",
        ["head=csr", "head.nesting=[8,2048]"],
        ["up to 2048 active units (k)", "1024 units", "head.expansion=8"],
    ),
    ("model", ["head=csr", "head.nesting=[0,8]"], ["head.nesting holds a size below 1"]),
    (
        "model",
        ["head.nesting=[8,1024]"],
        ["goes up to 1024", "source's 256 features", "features.projection_dim=1024"],
    ),
    ("model", ["head=ff", "head.dim=512"], ["head.dim=512", "features.projection_dim=512"]),
    ("model", ["head=adaptor", "head.nesting=[8,1024]"], ["adaptor keeps the source's width, 256"]),
    ("model", ["data.num_classes=5"], ["trained on 10 classes but the data has 5", "source=backbone"]),
    ("model", ["data.img_size=64"], ["takes 32 px images", "cannot resize", "data.img_size=32"]),
    ("model", ["data.in_chans=1"], ["takes 3-channel images but the data has 1-channel ones"]),
    ("cifar", [], ["preprocessed otherwise", "mean", "(source) vs", "source=backbone"]),
    ("missing", [], ["no such file", "source=backbone"]),
    ("directory", [], ["is a directory, not a model file"]),
    ("text", [], ["is not a model mrl can load", "it holds text"]),
    ("weights", [], ["is not a model mrl can load", "not an mrl model export"]),
    ("posthoc", [], ["is itself a head trained on a frozen source", "its own source"]),
    ("model", ["objective=supcon"], ["do not apply: objective=supcon", "head.contrastive=label"]),
    ("model", ["head.depth_stages=[1]"], ["do not apply: head.depth_stages"]),
    ("model", ["finetune.freeze_backbone=true"], ["do not apply: finetune.*"]),
    (
        "model",
        ["backbone.embed_dim=64"],
        ["do not apply: backbone.embed_dim=64", "features.projection_dim=64"],
    ),
    (
        "model",
        ["backbone.pretrained_path=/x.safetensors"],
        ["source=backbone backbone.pretrained_path=<file>"],
    ),
    ("model", ["head=csr", "features.projection_dim=8"], ["features.projection_dim=8 with head=csr"]),
    ("model", ["+features.cach_dir=/x"], ["features.cach_dir is not a setting", "cache_dir"]),
    ("model", ["features.dtype=int8"], ["features.dtype='int8' is not valid"]),
    (None, ["head=csr"], ["head=csr trains on a frozen model's features", "source=backbone"]),
]


def _case_id(case) -> str:
    source, overrides, _ = case
    return " ".join(overrides) if overrides else f"source={source}"


@pytest.mark.parametrize(("source", "overrides", "expected"), BAD, ids=[_case_id(c) for c in BAD])
def test_bad_input_is_refused_before_any_feature_is_computed(run_main, sources, source, overrides, expected):
    given = [] if source is None else [f"source={sources[source]}"]
    result = run_main("mrl-train", *TINY, "logger=none", *given, *overrides)
    assert result.returncode == 1
    assert "Traceback" not in result.output and "Error: " in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, result.output[-3000:]
    assert not (result.log_dir / "feature_cache").exists()  # no feature computed, no cache begun
    written = [
        p for run in result.run_dirs() for p in run.rglob("*") if p.suffix in (".ckpt", ".json", ".npy")
    ]
    assert written == [] and "Epoch 0" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_features_on_a_gpu_this_machine_lacks_are_refused(run_main, sources):
    result = run_main("mrl-train", *TINY, "logger=none", f"source={sources['model']}", "features.device=cuda")
    assert result.returncode == 1 and "Traceback" not in result.output
    assert "features.device=cuda but this machine has 0 CUDA GPU(s)" in result.output
    assert "features.device=cpu" in result.output and not (result.log_dir / "feature_cache").exists()
