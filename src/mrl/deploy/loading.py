"""``mrl.load``: a :class:`~mrl.deploy.model.MatryoshkaModel` from any file mrl reads a model from.

* the one-file export ``model.safetensors`` (``mrl-eval`` writes it, or :meth:`MatryoshkaModel.save`):
  its metadata describes the model, and reading it never unpickles anything;
* a checkpoint of ``mrl-train`` (``.ckpt``), read with ``torch.load(weights_only=True)``
  (:func:`mrl.training.checkpoints.load_model_file`): the model's description stored in it, or, in
  checkpoints written before it was stored, the one its training config gives;
* a checkpoint of the paper's repository (:mod:`mrl.models.paper_layout`).

Exports and checkpoints written before the model description (:class:`~mrl.models.spec.ModelSpec`)
existed are read by deriving it, so they keep loading.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mrl.deploy.model import FORMAT, FORMAT_VERSION, METADATA_KEY, MatryoshkaModel
from mrl.errors import MRLError
from mrl.models.backbone import build_with_upsizing
from mrl.models.build import build_model
from mrl.models.paper_layout import PaperCheckpoint
from mrl.models.spec import ModelSpec, Preprocessing, data_preprocessing, timm_preprocessing

log = logging.getLogger(__name__)

# The export layout before the model description was typed: its own JSON document (read, never written).
UNTYPED_FORMAT_VERSION = 1


def load(
    path: str | Path, device: str | torch.device = "cpu", paper_head: str | None = None
) -> MatryoshkaModel:
    """A :class:`MatryoshkaModel` in eval mode on ``device``, from an ``mrl-train`` checkpoint, a
    ``.safetensors`` export or a checkpoint of the paper's repository (RAIVNLab/MRL: a torchvision ResNet
    state dict, :mod:`mrl.models.paper_layout`; ``paper_head`` may name its head kind, None: read from the
    weights). Needs neither Hydra nor the training data."""
    path = Path(path)
    if not path.is_file():
        raise MRLError(
            f"{path} does not exist. Give the path of a model.safetensors written by mrl-eval (or "
            "MatryoshkaModel.save) or of a checkpoint written by mrl-train (checkpoints/last.ckpt)."
        )
    target = _check_device(device)
    model = _load_export(path) if _is_safetensors(path) else _load_checkpoint(path, paper_head)
    return model.to(target).eval()


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has (checked before anything is read)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise MRLError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:<index>'.") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MRLError(
                f"device={device!r} but no CUDA GPU is available here. Load the model with device='cpu' (or "
                "device='cuda' if torch.cuda.is_available() else 'cpu')."
            )
        if target.index is not None and target.index >= count:
            raise MRLError(
                f"device={device!r} but this machine has {count} GPU(s): use cuda:0 to cuda:{count - 1}."
            )
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise MRLError(f"device={device!r} but MPS is not available here; load with device='cpu'.")
    return target


def _is_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header; checkpoints are zip files.
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


# ---- the export ---------------------------------------------------------------------------------


def _load_export(path: Path) -> MatryoshkaModel:
    try:
        with safe_open(str(path), framework="pt") as f:  # reads the header only (checks the size, too)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from None
    if METADATA_KEY not in metadata:
        raise MRLError(
            f"{path} is a safetensors file but not an mrl model export (its metadata has no '{METADATA_KEY}' "
            "entry describing the model). Load the file mrl-eval wrote (model.safetensors) or the training "
            "checkpoint (.ckpt)."
        )
    try:
        document = json.loads(metadata[METADATA_KEY])
    except ValueError as err:
        raise MRLError(
            f"{path}: the mrl metadata is not valid JSON ({err}); export the model again."
        ) from None
    version = document.get("format_version") if isinstance(document, dict) else None
    readable = (UNTYPED_FORMAT_VERSION, FORMAT_VERSION)
    if not isinstance(document, dict) or document.get("format") != FORMAT or version not in readable:
        raise MRLError(
            f"{path} holds an mrl export of format version {version!r} (written by mrl "
            f"{document.get('mrl_version') if isinstance(document, dict) else '?'}); this mrl reads versions "
            f"{', '.join(map(str, readable))}. Use the mrl version that wrote it, or export the model again "
            "from its checkpoint."
        )
    try:
        spec = (
            ModelSpec.from_dict(document["model"]) if version == FORMAT_VERSION else _untyped_spec(document)
        )
    except (KeyError, TypeError, ValueError) as err:
        raise MRLError(f"{path}: the mrl metadata is incomplete ({err!r}); export the model again.") from None
    model = _model(spec, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from None
    _load_weights(model, tensors, path)
    return model


def _untyped_spec(document: dict[str, Any]) -> ModelSpec:
    """The spec of an export of format version 1, whose document described the model in its own layout."""
    b, h = document["backbone"], document["head"]
    return ModelSpec(
        backbone=b["name"],
        num_classes=int(h["num_classes"]),
        in_chans=int(b["in_chans"]),
        img_size=int(b["img_size"]),
        projection_dim=b.get("embed_dim"),
        drop_path_rate=b.get("drop_path_rate"),
        model_kwargs=dict(b.get("model_kwargs") or {}),
        blur_strided_convs=bool(b.get("blur_strided_convs", False)),
        head=h.get("kind", "mrl_e" if h["efficient"] else "mrl"),
        nesting=tuple(int(m) for m in h["nesting"]),
        bias=bool(h["bias"]),
        embed_dim=int(document["embed_dim"]),
        preprocessing=Preprocessing.from_dict(document["preprocessing"]),
    )


def _corrupt(path: Path, err: BaseException) -> MRLError:
    return MRLError(
        f"{path} is corrupt or truncated and cannot be read ({err}). Export the model again "
        "(mrl-eval ckpt_path=<checkpoint> writes model.safetensors, or mrl.load(ckpt).save(path))."
    )


# ---- checkpoints --------------------------------------------------------------------------------


def _load_checkpoint(path: Path, paper_head: str | None = None) -> MatryoshkaModel:
    from mrl.training.checkpoints import SPEC_KEY, checkpoint_config, load_model_file, load_paper_weights

    ckpt = load_model_file(path, paper_head)  # weights_only=True: never runs code from the file
    if isinstance(ckpt, PaperCheckpoint):
        model = _model(ckpt.spec, path)
        load_paper_weights(model, ckpt, path)
        return model
    # A stored training config is checked (no foreign _target_) before anything else is read from it.
    config = checkpoint_config(ckpt, path) if ckpt.get(SPEC_KEY) is None else None
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("backbone.", "head."))}
    if not isinstance(state.get("head.weight"), torch.Tensor):
        raise MRLError(
            f"Checkpoint {path} holds no Matryoshka head weights (head.weight): not an mrl-train model."
        )
    if ckpt.get(SPEC_KEY) is not None:
        try:
            model = _model(ModelSpec.from_dict(ckpt[SPEC_KEY]), path)
        except (KeyError, TypeError, ValueError) as err:
            raise MRLError(f"Checkpoint {path}: its model description is damaged ({err!r}).") from None
    else:
        model = _model_of_config(config, ckpt.get("mrl_nesting"), state, path)
    _load_weights(model, state, path)
    return model


def _model_of_config(
    config: dict[str, Any], nesting: list[int] | None, state: dict[str, torch.Tensor], path: Path
) -> MatryoshkaModel:
    """The model of a checkpoint written before the model description was stored, as its training
    config and weights describe it (the images' shape and preprocessing from its datamodule, rebuilt
    without its files where it can be)."""
    datamodule, in_chans, img_size, resizable = _data_shape(config["data"], path)
    spec = ModelSpec.from_config(
        config["backbone"],
        {**config["head"], "nesting": nesting or config["head"].get("nesting")},
        int(state["head.weight"].shape[0]),  # the class count, also for data sets that are not here
        in_chans,
        img_size,
    )
    spec = replace(spec, bias="head.bias" in state)
    _check_loadable(spec, path)
    # upsized for the backbone in training (mrl.training.assemble): preprocessing resizes stored images too
    (backbone, head, spec), size = build_with_upsizing(
        lambda px: build_model(replace(spec, img_size=px)), img_size, resizable
    )
    if datamodule is None:
        eval_size = config["data"].get("eval_img_size") or size
        preprocessing = timm_preprocessing(backbone.data_config(), backbone.in_chans, int(eval_size))
    else:
        datamodule.configure(img_size=size, data_config=backbone.data_config())
        preprocessing = data_preprocessing(datamodule)
    return MatryoshkaModel(replace(spec, preprocessing=preprocessing), backbone, head)


def _data_shape(data: dict[str, Any], path: Path) -> tuple[Any, int, int, bool]:
    """``(datamodule or None, in_chans, img_size, resizable)`` of the training data, without its files.

    The datamodule is constructed (not set up) from the stored config: the in-memory ones only record
    their settings then, so this reads no data. One that needs its files to be constructed (ImageFolder
    lists its class folders) falls back to the config's ``in_chans`` / ``img_size``.
    """
    kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        # Only mrl's own datamodules are constructed: a class path read from a file must never pick an
        # arbitrary callable to run.
        if not str(data.get("_target_", "")).startswith("mrl.data."):
            raise ValueError(f"not an mrl datamodule: {data.get('_target_')!r}")
        module_name, _, name = str(data["_target_"]).rpartition(".")
        datamodule = getattr(importlib.import_module(module_name), name)(**kwargs)
        in_chans, img_size = datamodule.in_chans, datamodule.img_size
        resizable = datamodule.upsizable
        return datamodule, int(in_chans), int(img_size), resizable
    except Exception as err:  # any failure means only "this datamodule cannot be built here"
        reason = f"{type(err).__name__}: {err}"
    if data.get("in_chans") is None or data.get("img_size") is None:
        raise MRLError(
            f"Checkpoint {path}: the image shape the model was trained on is unknown here. Its data config "
            f"has no in_chans/img_size and its datamodule {data.get('_target_')} cannot be built on this "
            f"machine ({reason}). Load it where the training data is, and export it with "
            "mrl.load(ckpt).save('model.safetensors') (or mrl-eval), then load that file."
        )
    log.info(
        "Datamodule %s not available here (%s): using the config's image shape.", data.get("_target_"), reason
    )
    return None, int(data["in_chans"]), int(data["img_size"]), False


# ---- building and filling the model -------------------------------------------------------------


def _model(spec: ModelSpec, path: Path) -> MatryoshkaModel:
    """The model of a spec read from ``path`` (random weights until :func:`_load_weights`)."""
    _check_loadable(spec, path)
    return MatryoshkaModel(spec)


def _check_loadable(spec: ModelSpec, path: Path) -> None:
    """The weights come from the file being loaded: timm arguments that read other files are refused, so
    a crafted file cannot make loading it read (and unpickle) anything else."""
    loading = sorted(
        k
        for k in spec.model_kwargs
        if k in ("pretrained", "checkpoint_path", "cache_dir") or k.startswith("pretrained_")
    )
    if loading:
        raise MRLError(
            f"{path}: the backbone's model_kwargs {loading} would load weights from other files; the "
            "deployment API only loads the weights stored with the model. Remove them."
        )


def _load_weights(model: MatryoshkaModel, state: dict[str, torch.Tensor], path: Path) -> None:
    from mrl.training.checkpoints import state_dict_differences

    detail = state_dict_differences(model.state_dict(), state)
    if detail:
        raise MRLError(
            f"The weights in {path} do not fit the model it describes ({detail}): the file was altered or "
            "written by an incompatible mrl/timm version. Export the model again from its training "
            "checkpoint with this version (mrl-eval ckpt_path=<ckpt>, or mrl.load(ckpt).save(path))."
        )
    model.load_state_dict(state)
