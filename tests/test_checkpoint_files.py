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
