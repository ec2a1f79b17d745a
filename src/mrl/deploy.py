"""The deployment API: load a trained model without Hydra and embed images at any Matryoshka size.

``mrl.load(path)`` reads either a checkpoint written by ``mrl-train`` (``.ckpt``) or the one-file export
``model.safetensors`` that ``mrl-eval`` writes beside its report (or :meth:`MatryoshkaModel.save`).
The export is self-describing: the safetensors metadata holds a JSON document (:attr:`MatryoshkaModel.spec`)
with the backbone, head, nesting, class count and eval preprocessing, and its tensors are the backbone
and head weights. Loading it never unpickles anything; loading a checkpoint uses
``torch.load(weights_only=True)`` (:func:`mrl.training.checkpoints.load_checkpoint`).

    model = mrl.load("logs/eval/runs/<job>_last/model.safetensors")
    z = model.embed(images, dim=64)          # (B, 64), L2-normalised
    classes = model.predict(images, dim=64)  # the size-64 classifier's argmax
"""

from __future__ import annotations

import importlib
import json
import logging
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mrl.errors import MRLError
from mrl.files import atomic_path
from mrl.models.backbone import TimmBackbone, build_with_upsizing
from mrl.models.heads import build_head
from mrl.models.paper_layout import PAPER_EVAL_SIZE, PaperCheckpoint, paper_eval_data_config
from mrl.nn.matryoshka_linear import MatryoshkaLinear

log = logging.getLogger(__name__)

FORMAT = "mrl-matryoshka-model"
# Bump when the metadata or tensor names change incompatibly; load() refuses versions it does not know.
FORMAT_VERSION = 1
METADATA_KEY = "mrl"
BACKBONE_TARGET = "mrl.models.backbone.TimmBackbone"
# Preprocessing kinds, one per way the datamodules feed images to the model at evaluation time.
TIMM = "timm_transform"  # image files (ImageFolder): timm's eval transform (resize, center crop, normalise)
UINT8 = "uint8_normalize"  # in-memory uint8 images (Fashion-MNIST, CIFAR): /255, bilinear resize, normalise
NONE = "none"  # the data already are the model's float inputs (synthetic images)

ImageInput = torch.Tensor | np.ndarray | Sequence[Any]


class MatryoshkaModel(nn.Module):
    """A trained backbone and Matryoshka head, ready to embed and classify images.

    Build it with :func:`load` (or :meth:`from_module`); ``spec`` is the JSON-able description that
    :meth:`save` stores in the export's metadata and from which the modules are rebuilt. ``backbone`` and
    ``head`` may be given to reuse modules already built (their weights are not changed).
    """

    def __init__(
        self, spec: dict[str, Any], backbone: TimmBackbone | None = None, head: MatryoshkaLinear | None = None
    ) -> None:
        super().__init__()
        b, h = spec["backbone"], spec["head"]
        if backbone is None:
            backbone = _timm_backbone(b, int(b["in_chans"]), int(b["img_size"]))
        if backbone.embed_dim != int(spec["embed_dim"]):
            raise MRLError(
                f"Backbone {b['name']} gives {backbone.embed_dim}-d embeddings here but the model was saved "
                f"with {spec['embed_dim']}-d ones: the timm version differs from the one that trained it. "
                "Install the timm version the model was trained with."
            )
        if head is None:
            head = MatryoshkaLinear(
                backbone.embed_dim, int(h["num_classes"]), h["nesting"], bool(h["efficient"]), bool(h["bias"])
            )
        self.backbone, self.head, self.spec = backbone, head, spec
        self.nesting: list[int] = list(head.nesting)
        self.embed_dim: int = backbone.embed_dim
        self.num_classes: int = head.num_classes
        self._transform = None
        self.eval()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, datamodule: Any) -> MatryoshkaModel:
        """The deployable part of a trained ``MatryoshkaLitModule``: its backbone and head (shared, not
        copied) with the eval preprocessing of ``datamodule`` (the one the module was evaluated with)."""
        backbone, head = module.backbone, module.head
        config = dict(getattr(module, "config", None) or {})
        preprocessing = _preprocessing(datamodule, backbone, config.get("data") or {})
        spec = _spec(config, backbone, head, preprocessing)
        return cls(spec, backbone=backbone, head=head)

    # ---- inference ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How raw images become model inputs: ``kind`` (``timm_transform``, ``uint8_normalize`` or
        ``none``), ``in_chans``, ``img_size``, ``mean``, ``std`` (and timm's crop settings)."""
        return self.spec["preprocessing"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full, unnormalised embedding ``z`` ``(B, embed_dim)`` of preprocessed images (traceable)."""
        return self.backbone(x)

    def embed(self, images: ImageInput, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Embeddings ``(B, dim)`` of ``images``: the first ``dim`` features of ``z``, L2-normalised after
        truncation (as ``mrl-eval`` searches them), on the model's device.

        ``dim`` may be any size from 1 to ``embed_dim`` (default: ``embed_dim``). The sizes of
        :attr:`nesting` are the ones the model was trained at; MRL prefixes in between also work well
        (interpolation, see ``mrl-eval``'s slice baseline) but were not optimised directly.
        ``images``: a float tensor ``(B, C, H, W)`` already preprocessed like the evaluation data, or raw
        images that :meth:`preprocess` accepts.
        """
        d = self._check_dim(dim)
        x = self.preprocess(images)
        self.eval()  # inference only: BatchNorm running statistics, no dropout
        with torch.inference_mode():
            z = self.backbone(x)[:, :d]
            return F.normalize(z, dim=1, eps=1e-12) if normalize else z

    def logits(self, images: ImageInput, dim: int | None = None) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of the size-``dim`` classifier (a trained size; default: the
        largest). Only that size's classifier is evaluated."""
        d = self.nesting[-1] if dim is None else self._check_dim(dim)
        if d not in self.nesting:
            raise MRLError(
                f"The model has classifiers for the sizes it was trained at, {self.nesting}, not {d}. Pass "
                f"dim= one of those to logits()/predict(); embed() works at any size 1..{self.embed_dim}."
            )
        g = self.nesting.index(d)
        x = self.preprocess(images)
        self.eval()
        with torch.inference_mode():
            z = self.backbone(x)[:, :d]
            return F.linear(z, self.head.size_weight(g), self.head.size_bias(g))

    def predict(self, images: ImageInput, dim: int | None = None) -> torch.Tensor:
        """Predicted class indices ``(B,)`` of the size-``dim`` classifier (see :meth:`logits`)."""
        return self.logits(images, dim).argmax(dim=-1)

    def _check_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.embed_dim
        try:
            d = operator.index(dim)
        except TypeError:
            raise MRLError(f"dim must be an integer size, got {dim!r}.") from None
        if not 1 <= d <= self.embed_dim:
            raise MRLError(
                f"dim={d} is not a size of this model's {self.embed_dim}-d embedding. Pass dim= between 1 "
                f"and {self.embed_dim}; it was trained at {self.nesting}."
            )
        return d

    # ---- preprocessing ------------------------------------------------------------------------

    @property
    def transform(self):
        """A per-image callable: one PIL image or uint8 array ``(H, W)`` / ``(H, W, C)`` -> the float tensor
        ``(C, H, W)`` the model takes (picklable, for a ``Dataset``'s transform)."""
        if self._transform is None:
            p = self.preprocessing
            if p["kind"] == TIMM:
                from timm.data import create_transform

                # The eval transform the ImageFolder datamodule uses (same timm data config).
                self._transform = create_transform(**p["data_config"], is_training=False)
            elif p["kind"] == UINT8:
                self._transform = Uint8Transform(p["in_chans"], p["img_size"], p["mean"], p["std"])
            else:
                raise MRLError(
                    "This model was trained on float tensors (synthetic data), not images: pass a float "
                    f"tensor (B, {p['in_chans']}, {p['img_size']}, {p['img_size']}) to embed()."
                )
        return self._transform

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Model inputs ``(B, C, H, W)`` on the model's device, from any of:

        * a float tensor ``(B, C, H, W)`` or ``(C, H, W)``: taken as already preprocessed (unchanged);
        * a uint8 tensor ``(B, C, H, W)``, ``(C, H, W)`` (the layout of the in-memory datamodules) or
          ``(H, W)`` (one grey image);
        * a uint8 numpy array: one image ``(H, W)`` / ``(H, W, C)``, or a batch ``(B, H, W, C)``;
        * one PIL image, or a list of PIL images or uint8 numpy arrays (any sizes: each is resized like
          the eval data).

        A single image gives a batch of one. Grey, RGB and RGBA images are converted to the model's
        channels as PIL's ``convert`` does (grey repeated to RGB, RGB to luminance, alpha dropped).
        """
        in_chans = int(self.preprocessing["in_chans"])
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            x = images if images.dim() == 4 else images.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != in_chans:
                raise MRLError(
                    f"Expected preprocessed images (B, {in_chans}, H, W), got a tensor of shape "
                    f"{tuple(images.shape)}."
                )
            return x.to(self.device)
        if isinstance(images, torch.Tensor):
            if images.dim() == 2:  # one grey image (H, W)
                images = images.unsqueeze(0)
            t = images if images.dim() == 4 else images.unsqueeze(0)
            if t.dim() != 4:
                raise MRLError(
                    f"Expected uint8 images (B, C, H, W), (C, H, W) or (H, W); got a tensor of shape "
                    f"{tuple(images.shape)}."
                )
            items: list[Any] = [img.permute(1, 2, 0).cpu().numpy() for img in t]  # (H, W, C) each
        elif isinstance(images, np.ndarray):
            items = list(images) if images.ndim == 4 else [images]
        elif _is_pil(images):
            items = [images]
        else:
            items = list(images)
        if not items:
            raise MRLError("No images given: pass at least one image.")
        transform = self.transform
        return torch.stack(
            [transform(_to_image(item, in_chans, self.preprocessing["kind"])) for item in items]
        ).to(self.device)

    # ---- export -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (weights + JSON metadata) that :func:`load` reads.

        Written under a temporary name and renamed, so an interrupted export never leaves a partial file
        at ``path``.
        """
        path = Path(path)
        if path.is_dir():
            raise MRLError(
                f"{path} is a directory: save() writes one file. Give its path, for example "
                f"model.save('{path / 'model.safetensors'}')."
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MRLError(
                f"Cannot write {path}: {path.parent} cannot be created ({err.strerror})."
            ) from None
        # safetensors refuses tensors that share memory; copies also detach from any device.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(self.spec, sort_keys=True, default=str)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path


class Uint8Transform:
    """uint8 image ``(H, W[, C])`` -> float ``(C, img_size, img_size)``: the in-memory datamodules' eval
    batch transform (:func:`mrl.data.preprocess.normalize_uint8_batch` without flipping), per image."""

    def __init__(self, in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.in_chans, self.img_size = int(in_chans), int(img_size)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from mrl.data.preprocess import normalize_uint8_batch

        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # a copy
        return normalize_uint8_batch(x, self.mean, self.std, flip=False, img_size=self.img_size)[0]


def _is_pil(item: Any) -> bool:
    return not isinstance(item, np.ndarray | torch.Tensor) and hasattr(item, "convert")


def _to_image(item: Any, in_chans: int, kind: str) -> Any:
    """One raw image as what the transform takes: a PIL image (timm) or a uint8 array ``(H, W, C)``."""
    if _is_pil(item):
        if kind == TIMM:
            return item.convert("L" if in_chans == 1 else "RGB")
        item = np.asarray(item.convert("L" if in_chans == 1 else "RGB"))
    array = np.asarray(item)
    if array.dtype != np.uint8:
        raise MRLError(
            f"Raw images must be uint8 (0-255), got {array.dtype}. Pass uint8 images, or a float tensor "
            "already preprocessed like the evaluation data."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise MRLError(
            f"Expected an image (H, W) or (H, W, C) with 1, 3 or 4 channels, or a batch (B, H, W, C); got an "
            f"image of shape {array.shape}."
        )
    array = _match_channels(array, in_chans)
    if kind == TIMM:
        from PIL import Image

        return Image.fromarray(array[:, :, 0] if in_chans == 1 else array)
    return array


def _match_channels(array: np.ndarray, in_chans: int) -> np.ndarray:
    """A uint8 ``(H, W, C)`` image with the model's channel count, converted as PIL converts modes."""
    channels = array.shape[2]
    if channels == in_chans:
        return array
    if in_chans == 3:
        return np.repeat(array, 3, axis=2) if channels == 1 else array[:, :, :3]
    if in_chans == 1:
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, :3])).convert("L"))[:, :, None]
    raise MRLError(
        f"The model takes {in_chans}-channel images; got an image with {channels}. Pass a float tensor "
        f"(B, {in_chans}, H, W) already preprocessed like the evaluation data."
    )


# ---- loading ------------------------------------------------------------------------------------


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
        spec = json.loads(metadata[METADATA_KEY])
    except ValueError as err:
        raise MRLError(
            f"{path}: the mrl metadata is not valid JSON ({err}); export the model again."
        ) from None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or version != FORMAT_VERSION:
        raise MRLError(
            f"{path} holds an mrl export of format version {version!r} (written by mrl "
            f"{spec.get('mrl_version') if isinstance(spec, dict) else '?'}); this mrl reads version "
            f"{FORMAT_VERSION}. Use the mrl version that wrote it, or export the model again from its "
            "checkpoint."
        )
    try:
        model = MatryoshkaModel(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise MRLError(f"{path}: the mrl metadata is incomplete ({err!r}); export the model again.") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from None
    _load_weights(model, tensors, path)
    return model


def _corrupt(path: Path, err: BaseException) -> MRLError:
    return MRLError(
        f"{path} is corrupt or truncated and cannot be read ({err}). Export the model again "
        "(mrl-eval ckpt_path=<checkpoint> writes model.safetensors, or mrl.load(ckpt).save(path))."
    )


def _load_checkpoint(path: Path, paper_head: str | None = None) -> MatryoshkaModel:
    from mrl.training.checkpoints import checkpoint_config, load_model_file

    ckpt = load_model_file(path, paper_head)  # weights_only=True: never runs code from the file
    if isinstance(ckpt, PaperCheckpoint):
        return _load_paper(path, ckpt)
    config = checkpoint_config(ckpt, path)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("backbone.", "head."))}
    if not isinstance(state.get("head.weight"), torch.Tensor):
        raise MRLError(
            f"Checkpoint {path} holds no Matryoshka head weights (head.weight): not an mrl-train model."
        )
    b = config["backbone"]
    if b.get("_target_", BACKBONE_TARGET) != BACKBONE_TARGET:
        raise MRLError(
            f"Checkpoint {path} uses backbone {b['_target_']}; the deployment API rebuilds {BACKBONE_TARGET} "
            "only. Use mrl-eval (which instantiates the configured backbone) for this checkpoint."
        )
    datamodule, in_chans, img_size, resizable = _data_shape(config["data"], path)
    backbone = _timm_backbone(b, in_chans, img_size, resizable)
    if datamodule is not None and backbone.img_size != datamodule.img_size:
        # upsized for the backbone in training (mrl.training.module.build_module_for_data): the exported
        # preprocessing must resize stored images the same way
        datamodule.resize(backbone.img_size)
    h = config["head"]
    kind = h.get("kind", "mrl")
    head = build_head(
        kind,
        backbone.embed_dim,
        int(state["head.weight"].shape[0]),  # the class count, also for data sets that are not here
        nesting=ckpt.get("mrl_nesting") or h.get("nesting"),
        min_size=h.get("min_size", 8),
        dim=h.get("dim"),
        bias="head.bias" in state,
    )
    model = MatryoshkaModel(
        _spec(config, backbone, head, _preprocessing(datamodule, backbone, config["data"])), backbone, head
    )
    _load_weights(model, state, path)
    return model


def _load_paper(path: Path, paper: PaperCheckpoint) -> MatryoshkaModel:
    """A checkpoint of the paper's repository: its ResNet with the paper's evaluation preprocessing."""
    from mrl.training.checkpoints import load_paper_weights

    config = paper.config()
    backbone = _timm_backbone(config["backbone"], 3, PAPER_EVAL_SIZE)
    head = build_head(
        paper.kind, backbone.embed_dim, paper.num_classes, paper.nesting, dim=paper.dim, bias=paper.bias
    )
    data_config = paper_eval_data_config(backbone.data_config())
    preprocessing = _timm_preprocessing(data_config, backbone.in_chans, PAPER_EVAL_SIZE)
    model = MatryoshkaModel(_spec(config, backbone, head, preprocessing), backbone, head)
    load_paper_weights(model, paper, path)
    return model


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


def _layer_class(key: str, value: Any) -> Any:
    """A model_kwargs entry that names a timm layer class the way recipes do (``{_target_:
    hydra.utils.get_class, path: timm.layers.BlurPool2d}``) becomes that class; only ``timm.layers``
    classes are accepted, so a file cannot make loading import anything else."""
    if not (isinstance(value, dict) and "_target_" in value):
        return value
    path = str(value.get("path", ""))
    if value["_target_"] != "hydra.utils.get_class" or not path.startswith("timm.layers."):
        raise MRLError(
            f"The backbone's model_kwargs.{key} names {value}; the deployment API only resolves timm layer "
            "classes (hydra.utils.get_class of timm.layers.*). Retrain or re-export without it."
        )
    import timm.layers

    layer = getattr(timm.layers, path.rsplit(".", 1)[1], None)
    if not isinstance(layer, type):
        raise MRLError(f"model_kwargs.{key}: timm.layers has no class {path}; check the timm version.")
    return layer


def _timm_backbone(
    config: dict[str, Any], in_chans: int, img_size: int, resizable: bool = False
) -> TimmBackbone:
    """The backbone of ``config`` with random weights (the trained ones are loaded afterwards: no
    pretrained download). Resizable small images are upsized like :func:`mrl.train.build_module_for_data`
    does (smallest power of two from 32 to 256 the backbone accepts), so the rebuilt model sees what it saw
    in training."""

    model_kwargs = dict(config.get("model_kwargs") or {})
    # The weights come from the file being loaded: timm arguments that read other files are refused, so a
    # crafted export cannot make loading it read (and unpickle) anything else.
    loading = sorted(
        k
        for k in model_kwargs
        if k in ("pretrained", "checkpoint_path", "cache_dir") or k.startswith("pretrained_")
    )
    if loading:
        raise MRLError(
            f"The backbone's model_kwargs {loading} would load weights from other files; the deployment API "
            "only loads the weights stored with the model. Remove them."
        )

    for key, value in list(model_kwargs.items()):
        model_kwargs[key] = _layer_class(key, value)

    def build(size: int) -> TimmBackbone:
        return TimmBackbone(
            name=config["name"],
            in_chans=in_chans,
            img_size=size,
            embed_dim=config.get("embed_dim"),
            drop_path_rate=config.get("drop_path_rate"),
            model_kwargs=model_kwargs,
            blur_strided_convs=bool(config.get("blur_strided_convs", False)),
        )

    return build_with_upsizing(build, img_size, resizable)[0]


def _preprocessing(datamodule: Any, backbone: TimmBackbone, data: dict[str, Any]) -> dict[str, Any]:
    """How ``datamodule`` (config ``data`` when it is None) turns stored images into model inputs at
    evaluation time (see the kinds above)."""
    in_chans = backbone.in_chans
    img_size = int(datamodule.img_size if datamodule is not None else backbone.img_size)
    data_config = datamodule.data_config if datamodule is not None else None
    if datamodule is None or data_config is not None:
        # File-based data: timm's eval transform of the backbone's data config at the evaluation size
        # (what ImageFolderDataModule sets up; eval_img_size may exceed the training size, FixRes).
        eval_size = (
            datamodule.eval_img_size if datamodule is not None else data.get("eval_img_size") or img_size
        )
        return _timm_preprocessing(data_config or backbone.data_config(), in_chans, int(eval_size))
    base = {"in_chans": in_chans, "img_size": img_size}
    mean, std = datamodule.mean, datamodule.std
    if mean is not None and std is not None:
        as_list = lambda v: [float(x) for x in torch.as_tensor(v).flatten()]  # noqa: E731
        return {"kind": UINT8, **base, "mean": as_list(mean), "std": as_list(std)}
    return {"kind": NONE, **base, "mean": None, "std": None}


def _timm_preprocessing(data_config: dict[str, Any], in_chans: int, img_size: int) -> dict[str, Any]:
    """The ``timm_transform`` preprocessing of a timm data config at ``img_size`` px."""
    data_config = {**data_config, "input_size": (in_chans, img_size, img_size)}
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    data_config = {k: data_config[k] for k in keys if k in data_config}
    return {
        "kind": TIMM,
        "in_chans": in_chans,
        "img_size": img_size,
        "mean": data_config.get("mean"),
        "std": data_config.get("std"),
        "data_config": data_config,
    }


def _spec(
    config: dict[str, Any], backbone: TimmBackbone, head: MatryoshkaLinear, preprocessing: dict[str, Any]
) -> dict[str, Any]:
    """The JSON description stored in an export: enough to rebuild the modules and preprocess images."""
    from mrl.version import __version__

    b, h = config.get("backbone") or {}, config.get("head") or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mrl_version": __version__,
        "backbone": {
            "name": backbone.name,
            "in_chans": backbone.in_chans,
            "img_size": backbone.img_size,  # the training size (evaluation may differ: preprocessing)
            # the projection size (null: the pooled features are the embedding)
            "embed_dim": backbone.embed_dim if isinstance(backbone.projection, nn.Linear) else None,
            "drop_path_rate": b.get("drop_path_rate"),
            "model_kwargs": b.get("model_kwargs") or {},
            "blur_strided_convs": backbone.blur_strided_convs,
        },
        "embed_dim": backbone.embed_dim,
        "head": {
            "kind": h.get("kind", "mrl_e" if head.efficient else "mrl"),
            "nesting": list(head.nesting),
            "num_classes": head.num_classes,
            "efficient": head.efficient,
            "bias": head.bias is not None,
        },
        "preprocessing": preprocessing,
        "data": config.get("data") or {},
    }


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
