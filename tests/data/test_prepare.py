"""mrl-prepare-data: every image mode is stored at the scale the loaders read it; every setting is judged
before anything is read or written; the leftovers of killed runs are removed; the console shows mrl's
progress and a next command that runs, whatever the paths hold. (Interrupted runs:
tests/cli/test_prepare_interrupts.py.)"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
from litdata import StreamingDataset
from PIL import Image

from mrl.data.generate import write_image_tree
from mrl.data.prepare import SETTINGS, prepare_shards
from mrl.errors import MRLError
from support import compose_train


def stored(shards, split: str) -> dict[int, list[np.ndarray]]:
    """The stored images of a split, decoded by PIL as grey, by label."""
    dataset = StreamingDataset(str(shards / split))
    out: dict[int, list[np.ndarray]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        grey = np.asarray(Image.open(io.BytesIO(item["image"])).convert("L"), dtype=np.int16)
        out.setdefault(int(item["label"]), []).append(grey)
    return out


def test_sixteen_bit_greys_are_stored_scaled_not_clipped_white(tmp_path):
    """convert("RGB") clipped 16-bit samples above 255: the shards held white images, and a model
    trained on them ran at chance while data=imagefolder on the same tree learned."""
    tree = tmp_path / "tree"
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # a ramp over every brightness
    pictures = {0: grey, 1: grey[:, ::-1].copy()}
    for split in ("train", "val"):
        for label, picture in pictures.items():
            (tree / split / f"c{label}").mkdir(parents=True)
            Image.fromarray(picture.astype(np.uint16) * 257).save(tree / split / f"c{label}" / "a.png")
    out = prepare_shards(str(tree), str(tmp_path / "out"), quality=100, num_workers=1, progress=False)
    for label, (image,) in stored(out, "val").items():
        error = np.abs(image - pictures[label].astype(np.int16))
        assert error.mean() < 1.5 and error.max() <= 8, (label, error.mean(), error.max())


BAD_SETTINGS = [
    ("max_side=abc", "max_side='abc' is not valid", "max_side=500"),
    ("max_side=4", "max_side=4 is not valid", "integer >= 8"),
    ("quality=high", "quality='high' is not valid", "quality=90"),
    ("quality=0", "quality=0 is not valid", "from 1 to 100"),
    ("num_workers=0", "num_workers=0 is not valid", "positive integer or null"),
    ("chunk_bytes=lots", "chunk_bytes='lots' is not valid", "chunk_bytes=64MB"),
    ("seed=x", "seed='x' is not valid", "an integer"),
    ("+max_sid=500", "max_sid is not an mrl-prepare-data setting", "max_side"),
]


@pytest.mark.parametrize(("setting", "message", "advice"), BAD_SETTINGS, ids=[s[0] for s in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_is_read(run_main, tmp_path, setting, message, advice):
    root = tmp_path / "tree"
    (root / "train" / "a").mkdir(parents=True)  # never read: no val/, no images
    result = run_main("mrl-prepare-data", f"root={root}", f"output_dir={tmp_path / 'out'}", setting)
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-2000:]
    assert message in result.output and advice in result.output, result.output[-2000:]
    assert not (tmp_path / "out").exists()


def test_leftovers_of_killed_runs_are_removed_and_a_live_run_is_refused(tiny_image_tree, tmp_path, capfd):
    """A hidden partial folder left by a killed run (its lock free) was never mentioned nor removed: GBs at
    ImageNet scale. A live run's folder (its lock held) must be left alone: for the same output_dir the
    new run is refused, as two runs would write over each other."""

    def partial(name: str, pid: int | None) -> Path:
        folder = tmp_path / name
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "chunk-0-0.bin").write_bytes(b"\0" * 2000)
        if pid is not None:
            owner = {"pid": pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}
            (folder / ".mrl-prepare-data.lock").write_text(json.dumps(owner))
        return folder

    killed = partial(".out.partial-0badc0de", pid=2**22 + 1)  # its lock file, nobody holds the lock
    elsewhere = partial(".other.partial-0badc0de", pid=2**22 + 2)  # a killed run of another output_dir
    unknown = partial(".out.partial-00000000", pid=None)  # written before the lock existed: unknown
    live = partial(".other.partial-11111111", pid=os.getpid())
    lock = os.open(live / ".mrl-prepare-data.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run of another output_dir, still writing
    try:
        capfd.readouterr()
        out = prepare_shards(str(tiny_image_tree), str(tmp_path / "out"), num_workers=1, progress=False)
        notices = capfd.readouterr().err
        assert f"Removed {killed} (2.1 KB): the leftovers of an mrl-prepare-data (pid {2**22 + 1}" in notices
        assert f"Removed {elsewhere} (" in notices and f"{unknown} (2.0 KB)" in notices
        assert "holds no lock file" in notices and "delete it once no mrl-prepare-data runs" in notices
        assert not killed.exists() and not elsewhere.exists() and unknown.is_dir() and live.is_dir()
        assert (out / "mrl_shards.json").is_file() and not list(tmp_path.glob(".out.partial-*[!0]"))

        with pytest.raises(MRLError, match=f"Another mrl-prepare-data \\(pid {os.getpid()} on .*other"):
            prepare_shards(str(tiny_image_tree), str(tmp_path / "other"), num_workers=1, progress=False)
        assert live.is_dir() and not (tmp_path / "other").exists()
        assert sorted(p.name for p in tmp_path.glob(".other.partial-*")) == [live.name]
    finally:
        os.close(lock)


# LitData's lines: its advert, its workers' chatter and its own progress bar
LITDATA_CHATTER = (
    "lightning.ai",
    "Worker ",
    "Setup ",
    "Workers are",
    "Rank ",
    "Storing the files",
    "Progress",
)


def test_paths_with_spaces_and_accents_prepare_quietly_and_the_next_command_runs(run_main, tmp_path):
    """The console showed LitData's account advert and per-worker lines, and the printed next command
    left the path unquoted: a space split it in two in the shell, and Hydra refuses an unquoted `ü`."""
    tree = write_image_tree(
        tmp_path / "my photos ü", classes=2, per_class={"train": 6, "val": 2}, size=(32, 24)
    )
    out = tmp_path / "shards, v2 ø"
    result = run_main("mrl-prepare-data", f"root='{tree}'", f"output_dir='{out}'", "num_workers=2")
    assert result.returncode == 0, result.output[-3000:]
    for chatter in LITDATA_CHATTER:
        assert chatter not in result.output, result.output
    assert "mrl-prepare-data: train: 12 images written in" in result.stdout, result.stdout
    assert len(StreamingDataset(str(out / "train"))) == 12 and len(StreamingDataset(str(out / "val"))) == 4
    assert json.loads((out / "mrl_shards.json").read_text())["source"] == str(tree)

    (line,) = (ln for ln in result.stdout.splitlines() if ln.startswith("Train from them with: "))
    program, *overrides = shlex.split(line.removeprefix("Train from them with: "))  # as a shell splits it
    assert program == "mrl-train" and overrides[0] == "data=shards", line
    assert compose_train(*overrides).data.input_dir == str(out), line


def test_help_lists_the_settings_of_mrl_prepare_data(run_main):
    """--help listed the training config groups (backbone, head, optim, ...), none of which apply."""
    result = run_main("mrl-prepare-data", "--help")
    assert result.returncode == 0, result.output[-2000:]
    for key in SETTINGS:
        assert f"\n  {key}=" in result.stdout, (key, result.stdout)
    for group in ("backbone:", "head:", "optim:", "trainer:"):
        assert group not in result.stdout, result.stdout
