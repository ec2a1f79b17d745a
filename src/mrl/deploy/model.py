"""The deployable model: a trained backbone and Matryoshka head that embed and classify images at any
size, and its one-file export (``model.safetensors``: the weights, and the model's description as JSON in
the metadata).

A CSR model (``mrl-train source=... head=csr``) embeds an image as a sparse code: its size-``k``
representation is the code of the ``k`` largest units of ``z`` (``mrl.nn.sparse_code_linear.size_view``),
returned dense, ``(B, hidden)`` with at most ``k`` non-zeros per row (see :meth:`MatryoshkaModel.embed`).
"""

from __future__ import annotations

import json
import operator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mrl.deploy.preprocessing import ImageInput, image_transform, to_batch
from mrl.errors import MRLError
from mrl.files import atomic_path
from mrl.models.backbone import TimmBackbone
from mrl.models.build import build_model
from mrl.models.spec import ModelSpec, Preprocessing, data_preprocessing
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.sparse_code_linear import SparseCodeLinear, size_view

FORMAT = "mrl-matryoshka-model"
# Bump when the metadata or tensor names change incompatibly; load() refuses versions it does not know.
# Version 1 described the model in an untyped layout of its own; 2 stores the ModelSpec under "model".
FORMAT_VERSION = 2
METADATA_KEY = "mrl"


class MatryoshkaModel(nn.Module):
    """A trained backbone and Matryoshka head, ready to embed and classify images.

    Build it with :func:`mrl.load` (or :meth:`from_module`); ``spec`` is the model's description, from
    which the modules are built and which :meth:`save` stores in the export. ``backbone`` and ``head``
    may be given to reuse modules already built (their weights are not changed).
    """

    def __init__(
        self,
        spec: ModelSpec,
        backbone: TimmBackbone | None = None,
        head: MatryoshkaLinear | SparseCodeLinear | None = None,
    ) -> None:
        super().__init__()
        if backbone is None or head is None:
            backbone, head, spec = build_model(spec)
        if spec.preprocessing is None:
            raise MRLError("A deployable model needs its preprocessing: the spec has none.")
        self.backbone, self.head, self.spec = backbone, head, spec
        self.nesting: list[int] = list(head.nesting)
        self.embed_dim: int = backbone.embed_dim
        self.num_classes: int = head.num_classes
        # a CSR model: sizes are numbers of active units of a sparse code of embed_dim (hidden) units
        self.sparse: bool = isinstance(head, SparseCodeLinear)
        self._transform = None
        self.eval()

    @classmethod
    def from_module(cls, module: nn.Module, datamodule: Any) -> MatryoshkaModel:
        """The deployable part of a trained ``MatryoshkaLitModule``: its backbone and head (shared, not
        copied) with the eval preprocessing of ``datamodule`` (the one the module was evaluated with)."""
        spec = replace(module.spec, preprocessing=data_preprocessing(datamodule))
        return cls(spec, backbone=module.backbone, head=module.head)

    # ---- inference ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def preprocessing(self) -> Preprocessing:
        """How raw images become model inputs: ``kind`` (``timm_transform``, ``uint8_normalize`` or
        ``none``), ``in_chans``, ``img_size``, ``mean``, ``std`` (and timm's ``data_config``)."""
        return self.spec.preprocessing

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

        A CSR model (:attr:`sparse`) returns sparse codes instead: ``dim=k`` gives the code of the ``k``
        largest units, a dense float tensor ``(B, embed_dim)`` (``embed_dim`` is the code's width,
        ``hidden``) with at most ``k`` non-zeros per row, all positive (fewer where the ReLU zeroed a
        unit), L2-normalised after the top-k is taken (as ``mrl-eval`` searches codes: cosine). ``k``
        may be any number from 1 to the largest trained one (default: it), ``nesting[-1]``; the top-k
        sets are nested, so the size-``k`` code is the largest code's ``k`` largest units. To store
        codes, keep each row's ``k`` values and unit indices (``code.topk(k)``, or
        ``code.to_sparse_csr()``): ``mrl.eval.sparse_codes.sparse_code_bytes(k, embed_dim)`` bytes.
        """
        d = self._check_dim(dim)
        x = self.preprocess(images)
        self.eval()  # inference only: BatchNorm running statistics, no dropout
        with torch.inference_mode():
            z = size_view(self.backbone(x), d, self.sparse)
            return F.normalize(z, dim=1, eps=1e-12) if normalize else z

    def logits(self, images: ImageInput, dim: int | None = None) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of the size-``dim`` classifier (a trained size; default: the
        largest). Only that size's classifier is evaluated."""
        d = self.nesting[-1] if dim is None else self._check_dim(dim)
        if d not in self.nesting:
            raise MRLError(
                f"The model has classifiers for the sizes it was trained at, {self.nesting}, not {d}. Pass "
                f"dim= one of those to logits()/predict(); embed() works at any size "
                f"1..{self.nesting[-1] if self.sparse else self.embed_dim}."
            )
        g = self.nesting.index(d)
        x = self.preprocess(images)
        self.eval()
        with torch.inference_mode():
            z = self.backbone(x)
            if self.sparse:  # the size-k classifier reads the top-k code of all hidden units
                return self.head.size_logits(z, g)
            return F.linear(z[:, :d], self.head.size_weight(g), self.head.size_bias(g))

    def predict(self, images: ImageInput, dim: int | None = None) -> torch.Tensor:
        """Predicted class indices ``(B,)`` of the size-``dim`` classifier (see :meth:`logits`)."""
        return self.logits(images, dim).argmax(dim=-1)

    def _check_dim(self, dim: int | None) -> int:
        """``dim`` as a size of this model: a prefix size 1..embed_dim, or a CSR model's number of active
        units 1..nesting[-1] (its ``z`` is the code of the largest k: it holds no more units)."""
        largest = self.nesting[-1] if self.sparse else self.embed_dim
        if dim is None:
            return largest
        try:
            d = operator.index(dim)
        except TypeError:
            raise MRLError(f"dim must be an integer size, got {dim!r}.") from None
        if self.sparse and not 1 <= d <= largest:
            raise MRLError(
                f"dim={d} is not a size of this CSR model: its codes of {self.embed_dim} units have at most "
                f"{largest} active units (it was trained at k={self.nesting}). Pass dim= between 1 and "
                f"{largest}."
            )
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
            self._transform = image_transform(self.preprocessing)
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
        return to_batch(images, self.preprocessing, lambda: self.transform).to(self.device)

    # ---- export -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (weights + JSON metadata) that :func:`mrl.load`
        reads.

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
        metadata = {"format": "pt", METADATA_KEY: json.dumps(export_metadata(self.spec), sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path


def export_metadata(spec: ModelSpec) -> dict[str, Any]:
    """The JSON document an export stores under :data:`METADATA_KEY`."""
    from mrl.version import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mrl_version": __version__,
        "model": spec.to_dict(),
    }
