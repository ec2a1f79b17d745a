"""Robustness sets: extra query sets given as ImageFolder trees (ImageNet-V2, -Sketch, -A, -R, ...),
classified by the trained Matryoshka heads at every size.

A set's class folders are mapped onto the training labels by name (``datamodule.classes``), never by
their sorted order, so a set may cover any subset of the classes in any order. When it covers a subset
(ImageNet-A and -R: 200 of the 1000 WNIDs) and ``restrict`` is on, the argmax runs over the covered
classes' logits only, as the paper's code masks ImageNet-A/R. The images go through the checkpoint's own
evaluation preprocessing (:func:`mrl.data.image_folder.image_files_loader`), their embeddings are
exported beside the splits' (``robustness_<name>_embeddings.npy``) and reused the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import read_file

from mrl.config_checks import robustness_sets
from mrl.data.image_folder import image_files_loader
from mrl.errors import MRLError
from mrl.eval.embeddings import export_loader
from mrl.eval.linear import linear_accuracy
from mrl.eval.model import fingerprint
from mrl.nn.matryoshka_linear import MatryoshkaLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RobustnessSet:
    """One set, listed and labelled with the training labels."""

    name: str
    root: Path
    listing: ImageFolder  # its image files; targets (and samples' labels) are the training labels
    covered: tuple[int, ...]  # the training labels of its class folders, ascending
    restrict: bool  # argmax over the covered classes only (when they are a subset)


@dataclass(frozen=True)
class SetEmbeddings:
    """A set's exported embeddings ``(N, D)`` and training labels ``(N,)``."""

    set: RobustnessSet
    embeddings: np.ndarray
    labels: np.ndarray


def class_labels(folders: Sequence[str], classes: Sequence[str], name: str, root: Path) -> list[int]:
    """The training label of each class folder, found by its name among ``classes`` (label order)."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        examples = ", ".join(list(classes)[:5])
        raise MRLError(
            f"Robustness set '{name}' ({root}) has class folders that are not classes of the training data: "
            f"{shown}. Each folder must be named exactly as a training class (here: {examples}, ...; "
            f"{len(classes)} classes, WNIDs for ImageNet); rename or remove the others."
        )
    return [index[f] for f in folders]


def index_labels(folders: Sequence[str], num_classes: int, name: str, root: Path) -> list[int]:
    """``folders: indices``: each class folder is named by its training label (ImageNet-V2's 0 ... 999)."""
    # canonical numbers only: "01" beside "1" would give one label two folders
    bad = [f for f in folders if not (f.isdigit() and str(int(f)) == f and int(f) < num_classes)]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise MRLError(
            f"Robustness set '{name}' ({root}) is read with folders: indices, but its class folders {shown} "
            f"are not label indices 0 ... {num_classes - 1}. Name the folders by label, or by class name "
            "with folders: names."
        )
    return [int(f) for f in folders]


def list_set(name: str, root: Path) -> ImageFolder:
    """torchvision's listing of a set's tree (``root/<class>/<image>``), its empty cases told as what to
    fix."""
    try:
        return ImageFolder(str(root), loader=read_file)
    except FileNotFoundError as err:
        what = (
            "holds no class folders"
            if "class folder" in str(err)
            else f"has class folders without image files ({', '.join(IMG_EXTENSIONS)})"
        )
        raise MRLError(
            f"Robustness set '{name}': {root} {what}. A set is an ImageFolder tree, <root>/<class>/<image>, "
            "every class folder named after a training class and holding its images; fix the tree or drop "
            f"the set (robustness.sets.{name})."
        ) from None


def label_set(listing: ImageFolder, labels: Sequence[int]) -> ImageFolder:
    """``listing`` with its folder indices replaced by the training labels ``labels[folder index]``."""
    listing.samples = [(path, labels[t]) for path, t in listing.samples]
    listing.imgs = listing.samples
    listing.targets = [t for _, t in listing.samples]
    listing.class_to_idx = {c: labels[i] for i, c in enumerate(listing.classes)}
    return listing


def open_sets(robustness: Any, datamodule) -> list[RobustnessSet]:
    """The configured sets (``robustness`` of conf/eval.yaml), listed and labelled by class name; every
    refusal (a missing root, an empty set, a folder that is no training class, data without image
    files) comes here, before any embedding is computed."""
    specs = robustness_sets(robustness, "")
    if not specs:
        return []
    datamodule.image_file_transform()  # refuses data sets whose model saw no image files
    sets = []
    for name, spec in specs.items():
        listing = list_set(name, spec["root"])
        if spec["folders"] == "indices":
            labels = index_labels(listing.classes, datamodule.num_classes, name, spec["root"])
        else:
            labels = class_labels(listing.classes, datamodule.classes, name, spec["root"])
        sets.append(
            RobustnessSet(
                name, spec["root"], label_set(listing, labels), tuple(sorted(labels)), spec["restrict"]
            )
        )
    return sets


def export_sets(
    module: torch.nn.Module,
    datamodule,
    sets: list[RobustnessSet],
    out_dir: Path,
    ckpt_path: str,
    train_cfg: dict,
    dtype: str,
    device: torch.device,
    precision: str | int | None,
) -> list[SetEmbeddings]:
    """Every set's embeddings (``robustness_<name>_embeddings.npy``, reused while the checkpoint, data
    config and the set's files and labels are unchanged); leaves the module on the CPU."""
    out = []
    for s in sets:
        fp = fingerprint(ckpt_path, train_cfg, f"robustness:{s.name}", dtype, datamodule.eval_img_size)
        listed = "\n".join(f"{path}\t{label}" for path, label in s.listing.samples)
        fp |= {"root": str(s.root.resolve()), "files": hashlib.sha256(listed.encode()).hexdigest()}
        loader = image_files_loader(datamodule, s.listing)
        n = len(s.listing)
        emb, labels = export_loader(
            module, datamodule, loader, n, f"robustness_{s.name}", out_dir, fp, dtype, device, precision
        )
        out.append(SetEmbeddings(s, emb, labels))
    module.cpu()
    return out


def robustness_section(
    head: MatryoshkaLinear, sets: list[SetEmbeddings], sizes: list[int], chunk: int
) -> dict[str, dict[str, Any]]:
    """``report.json``'s ``robustness``: per set its root, images, covered classes, whether the logits
    were restricted to them, and the top-1 of each reported size."""
    section = {}
    for item in sets:
        s = item.set
        restricted = s.restrict and len(s.covered) < head.num_classes
        covered = s.covered if restricted else None
        accuracy = linear_accuracy(head, item.embeddings, item.labels, chunk, covered)
        section[s.name] = {
            "root": str(s.root),
            "images": len(item.labels),
            "classes": len(s.covered),
            "restricted": restricted,
            "top1": {str(d): accuracy[d]["top1"] for d in sizes},
        }
        log.info("robustness set %s: %d images, %d classes", s.name, len(item.labels), len(s.covered))
    return section
