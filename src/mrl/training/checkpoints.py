"""Safe checkpoint loading and the checks that a checkpoint fits the model it is loaded into.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: tensors and plain containers
only, so a file crafted to run code when unpickled is refused instead of executed.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from mrl.errors import MRLError
from mrl.models.paper_layout import EXPECTED, PaperCheckpoint, is_state_dict, read_paper_state_dict

log = logging.getLogger(__name__)


class CorruptCheckpoint(MRLError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint at all)."""


CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
# The model's description (mrl.models.spec.ModelSpec.to_dict) in a checkpoint, beside the run's config
# (``mrl_config``) and trained sizes (``mrl_nesting``).
SPEC_KEY = "mrl_model"
# The training data's class names in label order (mrl.training.checkpoint_io.RecordClasses writes them):
# what label i of the model's classifiers means.
CLASSES_KEY = "mrl_classes"


@dataclass
class LoadedCheckpoint:
    """A checkpoint file read once and handed on: :meth:`take` gives its contents to the one reader that
    still needs them and forgets them, so no one keeps a run's weights and optimizer state alive."""

    path: Path
    contents: dict[str, Any] | None

    def take(self, path: str | Path) -> dict[str, Any] | None:
        """The contents, once, when ``path`` names this file (None otherwise, or when already taken)."""
        if self.contents is None or Path(path).resolve() != self.path.resolve():
            return None
        contents, self.contents = self.contents, None
        return contents


def require_checkpoint_file(path: str | Path) -> Path:
    """``path`` if it is a file, else an :class:`MRLError` saying which file to give instead."""
    path = Path(path)
    if not path.is_file():
        raise MRLError(
            f"Checkpoint {path} does not exist. Give the path of a .ckpt file written by mrl-train "
            "(the run's checkpoints/last.ckpt), or resume=<run dir>."
        )
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely; any problem becomes an :class:`MRLError` saying what to do."""
    path = require_checkpoint_file(path)
    return _lightning_checkpoint(_read_torch_file(path), path)


def load_model_file(path: str | Path, paper_head: str | None = None) -> dict[str, Any] | PaperCheckpoint:
    """What a model can be read from: a Lightning checkpoint of ``mrl-train`` (a dict), or a checkpoint of
    the paper's repository (a plain torchvision ResNet state dict, :mod:`mrl.models.paper_layout`), read
    safely as :func:`load_checkpoint` reads. ``paper_head`` names the head kind of a paper checkpoint
    (None: read from its keys)."""
    path = require_checkpoint_file(path)
    obj = _read_torch_file(path)
    if is_state_dict(obj):
        paper = read_paper_state_dict(obj, path, paper_head)
        log.info("Read %s as %s", path, paper.describe())
        return paper
    return _lightning_checkpoint(obj, path)


def _read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is no checkpoint, corrupt or holds
    pickled objects other than tensors and plain values is an :class:`MRLError`. The file is opened once:
    its first bytes are judged, then torch reads it from the start."""
    with open(path, "rb") as f:
        not_a_checkpoint = _not_a_checkpoint(f.read(512))
        if not_a_checkpoint:
            raise CorruptCheckpoint(
                f"{path} is not a checkpoint: {not_a_checkpoint}. Give the path of a .ckpt file written by "
                f"mrl-train (a run's {CHECKPOINT_DIR}/{LAST} or its best epoch*.ckpt)."
            )
        f.seek(0)
        return _torch_load(f, path)


def _torch_load(f: BinaryIO, path: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any pickled object that is not a tensor or plain container: that is
        # how a malicious checkpoint would run code. Never fall back to weights_only=False here, and never
        # pass on torch's advice to do so.
        detail = _torch_detail(err)
        if "GLOBAL" in detail:
            raise MRLError(
                f"Refusing to load {path}: it holds Python objects other than tensors and plain values "
                f"({detail}), and unpickling them could run code from the file. mrl only loads "
                "checkpoints written by mrl-train; if you trust this file, re-save its state_dict with "
                "plain tensors."
            ) from None
        raise _corrupt(path, detail) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise _corrupt(path, _torch_detail(err)) from None


def _lightning_checkpoint(ckpt: Any, path: Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise MRLError(
            f"{path} is not a Lightning checkpoint written by mrl-train (no state_dict). Give the "
            f"path of a .ckpt file from a run's {CHECKPOINT_DIR}/ folder."
        )
    return ckpt


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (every checkpoint Lightning writes)
PICKLE_PROTO = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode


def _not_a_checkpoint(head: bytes) -> str | None:
    """Why a file starting with ``head`` cannot be a torch checkpoint (None when it could be one)."""
    if not head:
        return "the file is empty"
    if head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        return None
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: a header length, then its JSON header
        return "it is a safetensors file (mrl.load reads the model.safetensors that mrl-eval exports)"
    try:
        head.decode("utf-8")
        return "it holds text"
    except UnicodeDecodeError:
        return "its first bytes are neither a PyTorch archive nor a pickle"


def _torch_detail(err: BaseException) -> str:
    """torch.load's reason without its advice (the weights_only=False suggestion, links to its docs)."""
    advice = ("weights_only", "Check the documentation", "Please file an issue", "high likelihood")
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not any(a in line for a in advice)]
    if not kept and lines and lines[0]:  # e.g. "... failed finding central directory. This is ..."
        kept = [lines[0].split(". ")[0]]
    return " ".join(kept).rstrip(".") or type(err).__name__


def _corrupt(path: Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"Checkpoint {path} is corrupt or truncated and cannot be read ({detail}). Use another checkpoint of "
        f"the run (in its {CHECKPOINT_DIR}/ folder) or train from scratch."
    )


def state_dict_differences(expected: dict[str, Any], stored: dict[str, Any]) -> str:
    """What keeps ``stored`` from loading into a model whose state dict is ``expected`` (missing and
    unexpected keys, shape mismatches, the first few of each), or "" when it fits."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [
        f"{k} {tuple(stored[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(stored))
        if tuple(stored[k].shape) != tuple(expected[k].shape)
    ]
    parts = (
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        f"shapes {', '.join(mismatched[:3])}" if mismatched else "",
    )
    return "; ".join(p for p in parts if p)


def load_paper_weights(model: nn.Module, paper: PaperCheckpoint, path: str | Path) -> None:
    """Load a paper checkpoint's weights into ``model``, an mrl model (LitModule or deployable model)
    built from ``paper.spec``; an :class:`MRLError` names what does not fit timm's model."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "head."))}
    # named as in the file (less its DDP prefix), not as mrl's model names them
    detail = state_dict_differences(expected, paper.state).replace("backbone.model.", "")
    if detail:
        raise MRLError(
            f"{path} reads as a {paper.describe()}, but its weights do not fit timm's {paper.arch} "
            f"({detail}). Expected {EXPECTED}."
        )
    # every backbone and head tensor is in the file (checked above); the model's other state (none in a
    # deployable model) keeps its values
    model.load_state_dict(paper.state, strict=False)


def check_compatible(
    ckpt: dict[str, Any],
    module: nn.Module,
    path: str | Path,
    config: dict,
    classes: Sequence[str] | None = None,
) -> None:
    """Raise an :class:`MRLError` when ``ckpt``'s weights do not fit ``module`` (another backbone,
    embedding size, nesting or class count), naming what differs, or when the data's ``classes`` (names
    in label order) are not the ones the checkpoint was trained on."""
    check_classes(ckpt, classes, path)
    tensors = state_dict_differences(module.state_dict(), ckpt["state_dict"])
    if not tensors:
        return
    saved = ckpt.get("mrl_config") or {}
    differences = []
    for key, label in (
        (("backbone", "name"), "backbone.name"),
        (("backbone", "embed_dim"), "backbone.embed_dim"),
        (("head", "kind"), "head"),
        (("head", "nesting"), "head.nesting"),
        (("data", "num_classes"), "data.num_classes"),
    ):
        old, new = _get(saved, key), _get(config, key)
        if old != new:
            differences.append(f"{label}: checkpoint {old!r}, this run {new!r}")
    if ckpt.get("mrl_nesting") is not None and list(ckpt["mrl_nesting"]) != list(
        getattr(module, "nesting", [])
    ):
        differences.append(f"trained sizes: checkpoint {ckpt['mrl_nesting']}, this run {module.nesting}")
    # the settings that differ say what to change; without them, the tensors that do not fit
    detail = "; ".join(differences) or tensors
    raise MRLError(
        f"Checkpoint {path} was trained with a different model and does not fit this one "
        f"({detail}). Use the same backbone, head and data settings as "
        "the run that wrote it (its config is stored in the checkpoint), or train without ckpt_path."
    )


def check_classes(ckpt: dict[str, Any], classes: Sequence[str] | None, path: str | Path) -> None:
    """Raise an :class:`MRLError` when the data's ``classes`` are as many as the checkpoint's but not the
    same names in the same order: every weight would fit, and label i would silently mean another class.
    (Another count is a model that does not fit: :func:`check_compatible` names ``data.num_classes``.)
    Checkpoints written before the names were stored are not checked."""
    stored = ckpt.get(CLASSES_KEY)
    if classes is None or stored is None or len(stored) != len(classes):
        return
    stored, given = [str(c) for c in stored], [str(c) for c in classes]
    if stored == given:
        return
    if sorted(stored) == sorted(given):
        detail = "the same classes in another label order"
    else:
        differ = [i for i, (a, b) in enumerate(zip(stored, given, strict=True)) if a != b]
        shown = "; ".join(
            f"label {i}: {stored[i]!r} in the checkpoint, {given[i]!r} in this data" for i in differ[:3]
        )
        more = "; ..." if len(differ) > 3 else ""
        detail = f"{len(differ)} of its {len(stored)} labels name other classes ({shown}{more})"
    raise MRLError(
        f"Checkpoint {path} was trained on other classes than this data has: {detail}. Its classifiers' "
        "label i means the checkpoint's class i, so training on or evaluating this data with it would mix "
        "the classes up. Use the data it was trained on (the run's resolved_config.yaml and the "
        "checkpoint hold its data settings), or train a new model on this data (without resume= or "
        "ckpt_path=)."
    )


# What a stored training config may instantiate when mrl-eval rebuilds its model and data. A checkpoint's
# config is data from a file: an arbitrary ``_target_`` there (``os.system``, ...) would run code when
# instantiated, which weights_only loading alone does not prevent.
ALLOWED_TARGETS = ("mrl.", "timm.optim.", "timm.scheduler.", "lightning.pytorch.")
GET_CLASS = "hydra.utils.get_class"
ALLOWED_CLASSES = ("timm.layers.",)


# Components that moved into the training wing: configs stored before the move name their old place.
RENAMED_TARGETS = {"mrl.schedules.": "mrl.training.schedules.", "mrl.ema.": "mrl.training.ema."}


def renamed_targets(config: Any) -> Any:
    """``config`` (a plain dict/list tree) with every ``_target_`` of a moved mrl component renamed to
    its current place, so checkpoints and run directories written before the move still load."""
    if isinstance(config, dict):
        out = {key: renamed_targets(value) for key, value in config.items()}
        target = out.get("_target_")
        for old, new in RENAMED_TARGETS.items():
            if isinstance(target, str) and target.startswith(old):
                out["_target_"] = new + target.removeprefix(old)
        return out
    if isinstance(config, list):
        return [renamed_targets(value) for value in config]
    return config


def check_config_targets(config: Any, path: str | Path, where: str = "mrl_config") -> None:
    """Raise an :class:`MRLError` when ``config`` names a ``_target_`` outside mrl, timm's optimizer,
    scheduler and layer factories, and Lightning (checked before anything is instantiated)."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None:
            target = str(target)
            ok = target.startswith(ALLOWED_TARGETS) or (
                target == GET_CLASS and str(config.get("path", "")).startswith(ALLOWED_CLASSES)
            )
            if not ok:
                raise MRLError(
                    f"Refusing to load {path}: its stored config ({where}) names {target!r} to instantiate, "
                    "which is not an mrl, timm or Lightning component, so rebuilding the model could run "
                    "arbitrary code. Only load checkpoints written by mrl-train."
                )
        for key, value in config.items():
            check_config_targets(value, path, f"{where}.{key}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_config_targets(value, path, f"{where}[{i}]")


REQUIRED = ("data", "backbone", "head")


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The training run's resolved config stored in the checkpoint (``mrl_config``)."""
    config = ckpt.get("mrl_config")
    if not isinstance(config, dict) or any(not isinstance(config.get(k), dict) for k in REQUIRED):
        raise MRLError(
            f"Checkpoint {path} holds no mrl training config (mrl_config with data, backbone and head), so "
            "mrl-eval cannot rebuild its model and data. Evaluate a checkpoint written by mrl-train (the "
            "run's checkpoints/last.ckpt or its best epoch*.ckpt)."
        )
    config = renamed_targets(config)
    check_config_targets(config, path)
    return config


def last_checkpoint(run_dir: Path) -> LoadedCheckpoint:
    """The checkpoint a resumed run continues from, read: the newest one that loads, among
    ``checkpoints/*.ckpt`` and the ``hpc_ckpt_*.ckpt`` files Lightning writes on a SLURM preemption
    signal (in the run dir). A truncated or corrupt newer file is skipped with a warning; one refused as
    unsafe is an error (someone put it there)."""
    candidates = [*(run_dir / CHECKPOINT_DIR).glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = sorted(
        (p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True
    )
    if not existing:
        raise MRLError(
            f"{run_dir} holds no checkpoint to resume from ({CHECKPOINT_DIR}/{LAST} is missing): the run "
            "was stopped before its first checkpoint. Start it again without resume=."
        )
    problems = []
    for path in existing:
        try:
            contents = load_checkpoint(path)
        except CorruptCheckpoint as err:
            problems.append(f"{path.name}: {err}")
            continue
        for problem in problems:
            log.warning("Skipping a checkpoint that cannot be loaded: %s", problem)
        return LoadedCheckpoint(path, contents)
    raise MRLError(
        f"None of the checkpoints of {run_dir} can be loaded ({'; '.join(problems)}). Start the run again "
        "without resume=, or give a good checkpoint with ckpt_path=<file>."
    )


def trained_epochs(ckpt: dict[str, Any]) -> int:
    """The epochs a Lightning checkpoint's run had completed: what Lightning restores as
    ``current_epoch`` (its loops' state; the ``epoch`` field for checkpoints without one)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError, ValueError):
        return int(ckpt.get("epoch") or 0)


def _get(config: dict, keys: tuple[str, ...]) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node
