"""What load_checkpoint answers for files that are not good checkpoints (in process, fast)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from mrl.errors import MRLError
from mrl.training.checkpoints import load_checkpoint


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _cases(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello, I am a README\n")
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(7, 256)) * 4)
    (tmp_path / "pickle_noise.ckpt").write_bytes(b"\x80\x02" + bytes(range(120, 256)) * 2)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "good.ckpt")
    good = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.ckpt")
    return [
        ("empty.ckpt", "is not a checkpoint: the file is empty"),
        ("text.ckpt", "is not a checkpoint: it holds text"),
        ("noise.ckpt", "is not a checkpoint: its first bytes are neither a PyTorch archive nor a pickle"),
        ("model.safetensors", "is not a checkpoint: it is a safetensors file"),
        ("pickle_noise.ckpt", "is corrupt or truncated"),
        ("truncated.ckpt", "is corrupt or truncated"),
        ("evil.ckpt", "Refusing to load .* GLOBAL posix.system"),
    ]


def test_files_that_are_not_good_checkpoints_are_told_apart(tmp_path):
    for name, words in _cases(tmp_path):
        with pytest.raises(MRLError, match=words) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert "weights_only" not in message and "trusted source" not in message  # torch's advice dropped
        assert ("run code" in message) == (name == "evil.ckpt"), message  # only real globals are "code"
    assert load_checkpoint(tmp_path / "good.ckpt")["state_dict"]["w"].shape == (3,)


def count_opens(monkeypatch, name: str) -> list[str]:
    """Every open of a file called ``name`` from now on (builtins.open and io.open: torch.load, fsspec
    and pathlib all open files through them)."""
    import builtins
    import io

    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.path.basename(file) == name:
            opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return opened


def test_the_chosen_checkpoint_is_read_once_and_handed_to_lightning(tmp_path, monkeypatch):
    from mrl.training.checkpoint_io import AtomicCheckpointIO
    from mrl.training.checkpoints import last_checkpoint

    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 4}, path)
    opened = count_opens(monkeypatch, "last.ckpt")
    chosen = last_checkpoint(tmp_path)  # judged and read in one open
    assert chosen.path == path and chosen.contents["epoch"] == 4 and len(opened) == 1
    io = AtomicCheckpointIO(chosen)
    assert io.load_checkpoint(str(path), weights_only=True)["epoch"] == 4 and len(opened) == 1
    assert chosen.contents is None  # handed on, not kept alive beside Lightning's copy
    assert io.load_checkpoint(path, weights_only=True)["epoch"] == 4 and len(opened) == 2  # read again
