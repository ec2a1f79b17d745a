"""Neighbour counts an evaluation asks for against the size of its database split, judged from the data
settings alone (no image read): ``mrl-train evaluate=`` checks them before training, ``mrl-eval`` once
the checkpoint's data config is known and before any embedding is computed. The searches themselves
refuse what gets past (a size the settings do not tell)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrl.errors import MRLError


def _neighbours_asked(eval_cfg: dict[str, Any]) -> list[tuple[str, str, int]]:
    """``(setting, =its value, k)`` of every search that needs ``k`` neighbours per query and refuses a
    database with fewer (mrl.eval.evaluators' knn+retrieval stage, quantized); adaptive retrieval takes
    what there is."""
    methods = eval_cfg.get("methods") or {}
    asked = []
    if methods.get("knn") or methods.get("retrieval"):
        ks = [int(k) for k in (eval_cfg.get("retrieval") or {}).get("ks") or []]
        asked += [("retrieval.ks", f"={ks}", max(ks))] if ks else []
        k = int((eval_cfg.get("knn") or {}).get("k") or 1)
        asked.append(("knn.k", f"={k}", k))
    if methods.get("quantized"):
        k = int((eval_cfg.get("quantized") or {}).get("k") or 1)
        asked.append(("quantized.k", f"={k}", k))
    return asked


def check_neighbours(eval_cfg: dict[str, Any], data: dict[str, Any], prefix: str = "") -> None:
    """Refuse neighbour counts above what the database split has, when the data settings tell its size
    before any image is read (:func:`split_size`): before training or embedding, not after. ``prefix``
    names the settings as the command line gave them (``evaluate.`` for mrl-train's)."""
    asked = _neighbours_asked(eval_cfg)
    split = str(eval_cfg.get("database_split", "train"))
    known = split_size(data, split, max((k for *_, k in asked), default=0) + 1) if asked else None
    if known is None:
        return
    size, why = known
    own = split == str(eval_cfg.get("query_split"))
    candidates = size - 1 if own else size
    over = [(name, value, k) for name, value, k in asked if k > candidates]
    if over:
        named = " and ".join(f"{prefix}{name}{value} ({k})" for name, value, k in over)
        others = " other" if own else ""
        raise MRLError(
            f"The evaluation's database, the {split} split, has {size} items ({why}), so each query has "
            f"{candidates}{others} items to rank, fewer than the neighbours {named} asks for. Lower "
            f"{' and '.join(prefix + n for n, *_ in over)} to at most {candidates}, or evaluate on more "
            "data."
        )


def split_size(data: dict[str, Any], split: str, enough: int) -> tuple[int, str] | None:
    """``(at most how many items split has, the setting or listing that says so)`` when the data settings
    tell it without reading images (a count of ``enough`` or more is not told); None otherwise."""
    import importlib

    from mrl.data.image_folder import ImageFolderDataModule
    from mrl.data.in_memory import InMemoryImageDataModule
    from mrl.data.shards import ShardDataModule
    from mrl.data.synthetic import SyntheticDataModule

    module, _, name = str(data.get("_target_", "")).rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name) if module.startswith("mrl.") else None
    except ImportError:
        return None
    kind = kind if isinstance(kind, type) else type(None)
    if issubclass(kind, SyntheticDataModule) and isinstance(data.get(f"{split}_size"), int):
        return data[f"{split}_size"], f"data.{split}_size={data[f'{split}_size']}"
    if issubclass(kind, InMemoryImageDataModule):
        bounds = [
            (
                "limit_train" if split == "train" else "limit_eval",
                data.get("limit_train" if split == "train" else "limit_eval"),
            )
        ]
        bounds += [("val_size", data.get("val_size"))] if split == "val" else []
        bounds = [(k, v) for k, v in bounds if isinstance(v, int) and v > 0]
        return min(((v, f"data.{k}={v}") for k, v in bounds), default=None)
    if issubclass(kind, ShardDataModule) and isinstance(data.get("input_dir"), str):
        return _shard_count(data["input_dir"], split)
    if issubclass(kind, ImageFolderDataModule) and isinstance(data.get("root"), str):
        return _folder_count(data, split, enough)
    return None


def _shard_count(input_dir: str, split: str) -> tuple[int, str] | None:
    from mrl.data.shards import METADATA_NAME, is_remote

    try:
        counts = json.loads((Path(input_dir).expanduser() / METADATA_NAME).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the data module reports a missing or damaged shard directory
    if is_remote(input_dir):
        return None
    split = split if split in counts or split != "test" else "val"
    count = counts.get(split)
    return (count, f"{input_dir} holds {count} {split} images") if isinstance(count, int) else None


def _folder_count(data: dict[str, Any], split: str, enough: int) -> tuple[int, str] | None:
    """The image files of an image folder's split (test: val when there is no test folder), counted up
    to ``enough``: a large tree is not listed whole here."""
    from mrl.data.tree import IMAGE_EXTENSIONS

    root = Path(data["root"]).expanduser()
    folder = root / str(data.get(f"{split}_split", split))
    if split == "test" and not folder.is_dir():
        folder = root / str(data.get("val_split", "val"))
    count = 0
    try:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            count += sum(1 for f in class_dir.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS))
            if count >= enough:
                return None
    except OSError:
        return None  # the data module's own checks name what is wrong with the tree
    return count, f"{folder} holds {count} images"
