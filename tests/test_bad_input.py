"""Bad input gets one clear paragraph, a non-zero exit and no traceback."""

import os

import pytest

from conftest import TINY

pytestmark = pytest.mark.slow

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
def test_bad_input_is_explained(run_cli, overrides, expected):
    data = ["data=fashion_mnist"] if overrides[0].startswith("data.") else TINY
    data = [] if overrides[0].startswith("data=") else data
    result = run_cli("mrl-train", *data, "logger=none", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))


# Rows of docs/bad_inputs.md that need a prepared file or an earlier run (the table above covers the rest).
def _earlier_run(run_cli, tmp_path):
    result = run_cli("mrl-train", *TINY, "logger=none", "test=false", "hydra.run.dir=earlier")
    assert result.returncode == 0, result.output[-2000:]
    return tmp_path / "earlier"


def _fingerprint(run_dir):
    # Hydra's record of a (refused) resume attempt goes to .hydra/resume/, beside the original's.
    files = (p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.suffix != ".log")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if ".hydra/resume" not in str(p)}


def _assert_clear_failure(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, result.output[-3000:]


def test_corrupt_missing_and_malicious_checkpoints_are_refused(run_cli, tmp_path):
    import torch

    earlier = _earlier_run(run_cli, tmp_path)
    before = _fingerprint(earlier)
    ckpt = earlier / "checkpoints" / "last.ckpt"

    _assert_clear_failure(run_cli("mrl-train", *TINY, f"ckpt_path={tmp_path}/none.ckpt"), "does not exist")
    _assert_clear_failure(
        run_cli("mrl-train", f"resume={tmp_path}/nowhere"), "not an mrl-train run directory"
    )
    _assert_clear_failure(
        run_cli("mrl-train", f"resume={earlier}", "head=mrl_e"), "changes a whole config group"
    )
    _assert_clear_failure(
        run_cli("mrl-train", *TINY, "backbone.name=resnet18", "logger=none", f"ckpt_path={ckpt}"),
        "trained with a different model",
        "backbone.name",
    )
    _assert_clear_failure(
        run_cli("mrl-train", *TINY, "data.num_classes=5", "logger=none", f"ckpt_path={ckpt}"),
        "data.num_classes",
    )
    assert _fingerprint(earlier) == before

    # Every checkpoint truncated (a lone bad one is skipped for the newest intact one: see
    # test_resume_in_place.py), then none at all, through the real resume path.
    ckpts = sorted((earlier / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) >= 2
    for path in ckpts:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    _assert_clear_failure(run_cli("mrl-train", f"resume={earlier}"), "corrupt or truncated")
    for path in ckpts:
        path.unlink()
    _assert_clear_failure(run_cli("mrl-train", f"resume={earlier}"), "no checkpoint to resume from")

    # A checkpoint that runs code when unpickled: refused, and the code never runs.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "payload": Evil()}, ckpt)
    _assert_clear_failure(run_cli("mrl-train", f"resume={earlier}"), "Refusing to load")
    assert not marker.exists()
    assert (earlier / "results.json").read_bytes() == before["results.json"]


def test_unwritable_output_dir_is_reported_before_training(run_cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli("mrl-train", *TINY, "logger=none", f"hydra.run.dir={blocker}/run")
    _assert_clear_failure(result)
    assert "Epoch 0" not in result.output


def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(run_cli, tmp_path):
    import torch

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
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


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


def test_checkpoint_config_naming_foreign_code_is_refused(run_cli, tmp_path):
    """weights_only loading is not enough: a stored config's ``_target_`` would be instantiated when
    mrl-eval (or mrl.load) rebuilds the model. A foreign one is refused before anything is built."""
    import torch

    import mrl
    from mrl.errors import MRLError

    marker = tmp_path / "pwned"
    config = {
        "data": {"_target_": "os.system", "command": f"touch {marker}"},
        "backbone": {"_target_": "mrl.models.backbone.TimmBackbone", "name": "test_byobnet"},
        "head": {"kind": "mrl"},
    }
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "mrl_config": config}, ckpt)
    _assert_clear_failure(run_cli("mrl-eval", f"ckpt_path={ckpt}"), "Refusing to load", "'os.system'")
    with pytest.raises(MRLError, match="Refusing to load"):
        mrl.load(ckpt)
    assert not marker.exists()
