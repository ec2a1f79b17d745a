"""Bad input gets one clear paragraph, a non-zero exit and no traceback.

Input refused before training is checked through the command's ``main`` run in this process
(``run_main``: the same command line, message and exit status as the console script, without seconds of
process start); the console scripts themselves refuse in
``test_the_console_scripts_refuse_with_one_paragraph``. What needs a trained run or trains is slow.
"""

import os
import shutil

import pytest
import torch

from support import TINY, run_command

CASES = [
    (["backbone.name=resnet5O"], ["Unknown backbone 'resnet5O'", "Did you mean", "resnet50"]),
    (["head.nesting=[8,4,16]"], ["strictly increasing"]),
    (["head.nesting=[8,1024]"], ["goes up to 1024", "backbone.embed_dim"]),
    (["data.data_dir=/nonexistent/fmnist"], ["Fashion-MNIST not found", "data.download=true"]),
    (["head=transformer"], ["head", "Available options", "mrl_e"]),
    (["head.weights=[1,2]", "head.nesting=[4,8,16]"], ["one relative importance weight per size"]),
    (["trainr.max_epochs=3"], ["trainr", "HYDRA_FULL_ERROR"]),
    (["data=shards", "data.input_dir=/nonexistent/shards"], ["holds no mrl_shards.json", "mrl-prepare-data"]),
    (["data=shards", "data.input_dir=/x", "data.decode=nvjpeg"], ["not a decode mode", "'cpu'", "'gpu'"]),
    (
        ["data=shards", "data.input_dir=/x", "+data.augment.auto_agument=rand-m9"],
        ["unknown key", "auto_augment"],
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[c[0][-1].split("=")[0] for c in CASES])
def test_bad_input_is_explained(run_main, overrides, expected):
    data = ["data=fashion_mnist"] if overrides[0].startswith("data.") else TINY
    data = [] if overrides[0].startswith("data=") else data
    result = run_main("mrl-train", *data, "logger=none", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))


# Settings refused by the pre-flight checks (mrl.config_checks): before training and before the job writes
# anything but Hydra's own record (.hydra/ and the log file).
PREFLIGHT = [
    (["head.nesting=8"], ["head.nesting=8 is a single value", "head.nesting=[8]"]),
    (["data.batch_size=0"], ["data.batch_size=0", "positive integer", "data.batch_size=256"]),
    (["backbone.embed_dim=-3"], ["backbone.embed_dim=-3", "positive integer"]),
    (["optim.lr=-1"], ["optim.lr=-1", "above 0"]),
    (["optim.lr=fast"], ["optim.lr='fast' is not a number"]),
    (["optim.opt=adamx"], ["optimizer settings do not work", "adamx"]),
    (["trainer.max_epochs=-1"], ["trainer.max_epochs=-1", "sched=none"]),
    (["evaluate={methds:{knn:true}}"], ["evaluate.methds is not an mrl-eval setting", "methods"]),
    (["evaluate={knn:{k:0}}"], ["evaluate.knn.k=0", "positive integer"]),
    (["evaluate={data:{dta_dir:/x}}"], ["evaluate.data has no setting 'dta_dir'", "batch_size"]),
    (["evaluate=true"], ["evaluate={}"]),
    (["optimized_metric=val/accuracy"], ["not a metric this job logs", "val/acc@full"]),
    (["head.nesting=[4,8]", "optimized_metric=val/acc@16"], ["names size 16", "[4, 8]"]),
    (["+data.dta_dir=/x"], ["data has no setting 'dta_dir'", "valid data keys are", "batch_size"]),
    (["optim.lr=${nope}"], ["The config cannot be used", "Interpolation key 'nope' not found"]),
    (["+head.wieghts=[1,2]"], ["head.wieghts is not a head setting", "weights, fused"]),
]


def _written(run_dirs) -> list[str]:
    """What jobs wrote besides Hydra's record of the composition and the job log."""
    return [
        str(p)
        for run in run_dirs
        for p in run.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    ]


@pytest.mark.parametrize(("overrides", "expected"), PREFLIGHT, ids=[c[0][-1] for c in PREFLIGHT])
def test_bad_settings_are_refused_before_anything_runs(run_main, overrides, expected):
    result = run_main("mrl-train", *TINY, "logger=none", *overrides)
    _assert_clear_failure(result, *expected)
    assert "Epoch 0" not in result.output and "Seed set" not in result.output  # training never started
    assert _written(result.run_dirs()) == []


@pytest.mark.slow
def test_the_console_scripts_refuse_with_one_paragraph(run_cli, tmp_path):
    """The other refusals run a command's main in this process; here the installed console scripts
    themselves: exit status 1, the message and no traceback, nothing written and nothing run."""
    train = run_cli("mrl-train", *TINY, "logger=none", "head.nesting=8")
    _assert_clear_failure(train, "head.nesting=8 is a single value", "head.nesting=[8]")
    assert train.returncode == 1 and "Seed set" not in train.output
    assert _written(train.run_dirs()) == []
    evaluated = run_cli("mrl-eval", f"ckpt_path={_foreign_code_checkpoint(tmp_path)}")
    _assert_clear_failure(evaluated, "Refusing to load", "'os.system'")
    assert evaluated.returncode == 1 and not (tmp_path / "pwned").exists()


def test_a_later_size_error_names_head_dim_and_a_metric_of_default_sizes(run_main):
    """Checked once the model is built (its embedding size measured), still before training."""
    ff = run_main("mrl-train", *TINY, "logger=none", "head=ff", "head.dim=512")
    _assert_clear_failure(
        ff, "head.dim=512 but the embedding has only 256 features", "backbone.embed_dim=512"
    )
    assert "head.nesting" not in ff.output
    # the last resort: a setting no check knows, that the component it configures refuses
    kwargs = run_main("mrl-train", *TINY, "logger=none", "+backbone.model_kwargs.bogus=1")
    _assert_clear_failure(kwargs, "Could not build backbone", "'bogus'", "backbone.* overrides")
    metric = run_main("mrl-train", *TINY, "logger=none", "optimized_metric=val/acc@3")
    _assert_clear_failure(metric, "names size 3", "val/acc@full")
    assert "Epoch 0" not in metric.output
    assert not list((metric.log_dir / "train" / "runs").glob("*/checkpoints"))


@pytest.mark.slow
def test_pretrained_weights_without_a_local_copy_fail_at_once(run_cli, tmp_path):
    """A process of its own: huggingface_hub reads HF_HOME (the empty cache here) when it is imported."""
    import time

    start = time.perf_counter()
    result = run_cli(
        "mrl-train", *TINY, "logger=none", "backbone.pretrained=true", env={"HF_HOME": str(tmp_path / "hf")}
    )
    _assert_clear_failure(result, "no local copy of its weights", "backbone.pretrained_path=<file>")
    assert "Retrying" not in result.output and "huggingface.co" not in result.output
    assert time.perf_counter() - start < 30  # no network retries


# Rows of docs/bad_inputs.md that need a prepared file or an earlier run (the table above covers the rest).
@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One finished tiny run (no test stage, no logger); tests refuse things against copies of it."""
    tmp = tmp_path_factory.mktemp("earlier")
    result = run_command("mrl-train", *TINY, "logger=none", "test=false", "hydra.run.dir=earlier", cwd=tmp)
    assert result.returncode == 0, result.output[-2000:]
    return tmp / "earlier"


@pytest.fixture
def earlier_run(trained_once, tmp_path):
    """A copy of ``trained_once`` of this test's own, at ``tmp_path/earlier``."""
    return shutil.copytree(trained_once, tmp_path / "earlier")


def _fingerprint(run_dir):
    # Hydra's record of a (refused) resume attempt goes to .hydra/resume/, beside the original's.
    files = (p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.suffix != ".log")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if ".hydra/resume" not in str(p)}


def _assert_clear_failure(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, result.output[-3000:]


@pytest.mark.slow
def test_corrupt_missing_and_malicious_checkpoints_are_refused(run_main, earlier_run, tmp_path):
    earlier = earlier_run
    before = _fingerprint(earlier)
    ckpt = earlier / "checkpoints" / "last.ckpt"

    _assert_clear_failure(run_main("mrl-train", *TINY, f"ckpt_path={tmp_path}/none.ckpt"), "does not exist")
    _assert_clear_failure(
        run_main("mrl-train", f"resume={tmp_path}/nowhere"), "not an mrl-train run directory"
    )
    _assert_clear_failure(
        run_main("mrl-train", f"resume={earlier}", "head=mrl_e"), "changes a whole config group"
    )
    _assert_clear_failure(
        run_main("mrl-train", *TINY, "backbone.name=resnet18", "logger=none", f"ckpt_path={ckpt}"),
        "trained with a different model",
        "backbone.name",
    )
    _assert_clear_failure(
        run_main("mrl-train", *TINY, "data.num_classes=5", "logger=none", f"ckpt_path={ckpt}"),
        "data.num_classes",
    )
    assert _fingerprint(earlier) == before

    # Every checkpoint truncated (a lone bad one is skipped for the newest intact one: see
    # test_resume_in_place.py), then none at all, through the real resume path.
    ckpts = sorted((earlier / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) >= 2
    for path in ckpts:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    _assert_clear_failure(run_main("mrl-train", f"resume={earlier}"), "corrupt or truncated")
    for path in ckpts:
        path.unlink()
    _assert_clear_failure(run_main("mrl-train", f"resume={earlier}"), "no checkpoint to resume from")

    # A checkpoint that runs code when unpickled: refused, and the code never runs.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "payload": Evil()}, ckpt)
    _assert_clear_failure(run_main("mrl-train", f"resume={earlier}"), "Refusing to load")
    assert not marker.exists()
    assert (earlier / "results.json").read_bytes() == before["results.json"]


def test_unwritable_output_dir_is_reported_before_training(run_main, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_main("mrl-train", *TINY, "logger=none", f"hydra.run.dir={blocker}/run")
    _assert_clear_failure(result)
    assert "Epoch 0" not in result.output


@pytest.mark.slow
def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(run_cli, tmp_path):
    result = run_cli(
        "mrl-train",
        *TINY,
        "logger=none",
        "optim=sgd",
        "optim.lr=1e12",
        "sched=none",
        "checkpoint_every_n_steps=1",
        "hydra.run.dir=nan",
    )
    _assert_clear_failure(result, "training loss became", "last good checkpoint")
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the checkpoint written before the loss diverged is kept"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_wandb_online_without_credentials_falls_back_to_offline(run_cli, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = run_cli(
        "mrl-train",
        *TINY,
        "logger.wandb.offline=false",
        "hydra.run.dir=online",
        env={"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(home), "NETRC": str(home / ".netrc")},
    )
    assert result.returncode == 0, result.output[-3000:]
    assert "logging offline" in result.output
    assert list((tmp_path / "online" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_wandb_online_with_credentials_but_no_server_falls_back_to_offline(run_cli, tmp_path):
    """A key but no reachable server (no network, a wrong WANDB_BASE_URL): offline, not a 90 s hang and
    a crash."""
    result = run_cli(
        "mrl-train",
        *TINY,
        "logger.wandb.offline=false",
        "hydra.run.dir=unreachable",
        env={"WANDB_MODE": "", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
    )
    assert result.returncode == 0, result.output[-3000:]
    assert "127.0.0.1:9 is not reachable" in result.output and "logging offline" in result.output
    assert list((tmp_path / "unreachable" / "wandb").glob("offline-run-*"))


def _foreign_code_checkpoint(tmp_path):
    """A checkpoint whose stored config names ``os.system`` (touching ``tmp_path/pwned``) to instantiate."""
    config = {
        "data": {"_target_": "os.system", "command": f"touch {tmp_path / 'pwned'}"},
        "backbone": {"_target_": "mrl.models.backbone.TimmBackbone", "name": "test_byobnet"},
        "head": {"kind": "mrl"},
    }
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "mrl_config": config}, ckpt)
    return ckpt


def test_checkpoint_config_naming_foreign_code_is_refused(run_main, tmp_path):
    """weights_only loading is not enough: a stored config's ``_target_`` would be instantiated when
    mrl-eval (or mrl.load) rebuilds the model. A foreign one is refused before anything is built."""
    import mrl
    from mrl.errors import MRLError

    marker = tmp_path / "pwned"
    ckpt = _foreign_code_checkpoint(tmp_path)
    _assert_clear_failure(run_main("mrl-eval", f"ckpt_path={ckpt}"), "Refusing to load", "'os.system'")
    with pytest.raises(MRLError, match="Refusing to load"):
        mrl.load(ckpt)
    assert not marker.exists()


def _damaged_tree(root, damage: str):
    """A 3-class ImageFolder tree of tiny JPEGs with one defect."""
    import shutil

    from mrl.data.generate import write_image_tree

    write_image_tree(root, classes=3, per_class={"train": 8, "val": 2}, size=(40, 30))
    bad = root / "train" / "class_0001" / "000003.jpg"
    if damage == "empty_class":
        shutil.rmtree(root / "train" / "class_0001")
        (root / "train" / "class_0001").mkdir()
    elif damage == "empty_val":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    elif damage == "not_an_image":
        bad.write_text("these are notes, not a JPEG")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    return root, bad


TREE_CASES = [
    ("empty_class", [], ["class_0001", "hold no image files", "add images, or remove the class folder"]),
    ("empty_val", [], ["val holds no class folders", "one folder of images per class"]),
    ("not_an_image", [], ["Cannot decode", "000003.jpg", "Unsupported image file", "Replace or delete"]),
    # read by a loader worker process: its traceback text must not reach the message
    ("truncated", ["data.num_workers=2"], ["Cannot decode", "000003.jpg", "truncated", "Replace or delete"]),
    ("in_chans", ["data.in_chans=1"], ["data.in_chans=1", "read as RGB", "data.in_chans=3"]),
]


@pytest.mark.parametrize(("damage", "extra", "expected"), TREE_CASES, ids=[c[0] for c in TREE_CASES])
def test_image_folder_problems_are_explained(run_main, tmp_path, damage, extra, expected):
    root, bad = _damaged_tree(tmp_path / "tree", damage)
    result = run_main(
        "mrl-train",
        "data=imagefolder",
        f"data.root={root}",
        "data.img_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "threads=1",
        "logger=none",
        *extra,
    )
    _assert_clear_failure(result, *expected)
    assert "DataLoader worker" not in result.output and "Original Traceback" not in result.output
    if damage in ("not_an_image", "truncated"):
        assert str(bad) in result.output  # the file to replace, by its full path
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))


@pytest.mark.slow
def test_eval_and_resume_refuse_bad_settings_and_files(run_main, earlier_run, tmp_path):
    earlier = earlier_run
    ckpt = earlier / "checkpoints" / "last.ckpt"

    k0 = run_main("mrl-eval", f"ckpt_path={ckpt}", "logger=none", "knn.k=0")
    _assert_clear_failure(k0, "knn.k=0", "positive integer")
    assert not list((k0.log_dir / "eval").rglob("*.npy"))  # refused before the embeddings were computed

    typo = run_main("mrl-eval", f"ckpt_path={ckpt}", "logger=none", "+data.dta_dir=/data")
    _assert_clear_failure(typo, "data has no setting 'dta_dir'", "valid data keys are", "batch_size")

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(7, 256)) * 4)
    for path, words in ((text, "it holds text"), (noise, "neither a PyTorch archive nor a pickle")):
        result = run_main("mrl-eval", f"ckpt_path={path}", "logger=none")
        _assert_clear_failure(result, "is not a checkpoint", words)
        assert "weights_only" not in result.output and "run code" not in result.output

    if not torch.cuda.is_available():
        cuda = run_main("mrl-eval", f"ckpt_path={ckpt}", "logger=none", "device=cuda")
        _assert_clear_failure(cuda, "no CUDA GPU is available")

    broken = tmp_path / "broken_run"
    shutil.copytree(earlier, broken)
    (broken / "resolved_config.yaml").write_text("data: {_target_: x\n  batch_size: [1,\n")
    result = run_main("mrl-train", f"resume={broken}")
    _assert_clear_failure(result, "resolved_config.yaml is corrupt and cannot be read", "cannot be resumed")
