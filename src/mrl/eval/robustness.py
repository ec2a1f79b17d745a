"""Robustness sets: extra query sets given as ImageFolder trees (ImageNet-V2, -Sketch, -A, -R, ...),
classified by the trained Matryoshka heads at every size.

A set's class folders are mapped onto the training labels by name (``datamodule.classes``), never by
their sorted order, so a set may cover any subset of the classes in any order. When it covers a subset
(ImageNet-A and -R: 200 of the 1000 WNIDs) and ``restrict`` is on, the argmax runs over the covered
classes' logits only, as the paper's code masks ImageNet-A/R. The sets are the robustness evaluator's
query sets (:func:`query_sets`): opened before any embedding is computed, their images read through the
checkpoint's own evaluation preprocessing (:func:`mrl.data.image_folder.image_files`) and exported with
the splits (``robustness_<name>_embeddings.npy``), reused the same way.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from mrl.config_checks import Node, boolean, mapping, one_of, require
from mrl.data.image_folder import image_files, list_image_folder
from mrl.errors import MRLError
from mrl.eval.context import EmbeddedSet, QuerySet
from mrl.eval.linear import linear_accuracy
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

    def refusal(empty: str | None) -> str:
        what = (
            "holds no class folders"
            if empty is None
            else f"has class folders without image files ({', '.join(IMG_EXTENSIONS)})"
        )
        return (
            f"Robustness set '{name}': {root} {what}. A set is an ImageFolder tree, <root>/<class>/<image>, "
            "every class folder named after a training class and holding its images; fix the tree or drop "
            f"the set (robustness.sets.{name})."
        )

    return list_image_folder(root, refusal)


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


def query_sets(settings: DictConfig, datamodule) -> list[QuerySet]:
    """The robustness evaluator's query sets (``settings.robustness``, conf/eval.yaml): each configured
    set opened (:func:`open_sets`), its files read as ``datamodule``'s evaluation images, its identity
    the listed files and their labels."""
    out = []
    for s in open_sets(OmegaConf.to_container(settings.robustness, resolve=True), datamodule):
        listed = "\n".join(f"{path}\t{label}" for path, label in s.listing.samples)
        identity = {"root": str(s.root.resolve()), "files": hashlib.sha256(listed.encode()).hexdigest()}
        out.append(QuerySet(s.name, image_files(datamodule, s.listing), identity, s))
    return out


def robustness_section(
    head: MatryoshkaLinear, sets: list[EmbeddedSet], sizes: list[int], chunk: int
) -> dict[str, dict[str, Any]]:
    """``report.json``'s ``robustness``: per set its root, images, covered classes, whether the logits
    were restricted to them, and the top-1 of each reported size."""
    section = {}
    for item in sets:
        s: RobustnessSet = item.set.spec
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


# ---- settings ----------------------------------------------------------------------------------------

ROBUSTNESS_SET_KEYS = ("root", "restrict", "folders")
# how a set's class folders name the training classes: by class name, or by label index (ImageNet-V2)
ROBUSTNESS_FOLDERS = ("names", "indices")


def robustness_sets(node: Any, p: str) -> dict[str, dict[str, Any]]:
    """``robustness.sets`` checked, as ``{name: {"root": Path, "restrict": bool, "folders": str}}`` (a
    set's own ``restrict`` / ``folders``, else ``robustness.restrict`` / ``robustness.folders``): every
    name usable in file names, every root an existing folder. Whether its folders are training classes
    is checked once the checkpoint's data is known (:func:`open_sets`)."""
    q = f"{p}robustness."
    robustness = mapping(node, f"{p}robustness", f"+{q}sets.v2=/data/imagenetv2")
    boolean(robustness, "restrict", q)
    one_of(robustness, "folders", q, ROBUSTNESS_FOLDERS)
    sets = mapping(robustness.get("sets"), f"{q}sets", f"+{q}sets.v2=/data/imagenetv2")
    return {str(name): _robustness_set(str(name), spec, robustness, q) for name, spec in sets.items()}


def _robustness_set(name: str, spec: Any, defaults: Node, q: str) -> dict[str, Any]:
    key = f"{q}sets.{name}"
    require(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None,
        f"{q}sets",
        name,
        "named with letters, digits, '_', '-' and '.' (the name is part of file names)",
        f"+{q}sets.imagenet_a=/data/imagenet-a",
    )
    spec = {"root": spec} if isinstance(spec, str) else mapping(spec, key, f"+{key}=/data/{name}")
    unknown = sorted(set(spec) - set(ROBUSTNESS_SET_KEYS))
    if unknown or not isinstance(spec.get("root"), str):
        raise MRLError(
            f"{key}={spec!r} is not valid: give the set's folder ({key}=<dir>) or "
            f"{{root: <dir>, restrict: true|false, folders: names|indices}} (keys "
            f"{', '.join(ROBUSTNESS_SET_KEYS)}{'; unknown: ' + ', '.join(unknown) if unknown else ''})."
        )
    boolean(spec, "restrict", f"{key}.")
    one_of(spec, "folders", f"{key}.", ROBUSTNESS_FOLDERS)
    root = Path(spec["root"]).expanduser().absolute()
    if not root.is_dir():
        raise MRLError(
            f"{key}: {root} {'is not a folder' if root.exists() else 'does not exist'}. Give the root "
            "of an ImageFolder tree, <root>/<class>/<image>, whose folders are named after the "
            "training data's classes (WNIDs for ImageNet)."
        )
    return {
        "root": root,
        "restrict": bool(spec.get("restrict", defaults["restrict"])),
        "folders": str(spec.get("folders", defaults["folders"])),
    }


def check_robustness(cfg: Node, p: str) -> None:
    """``robustness`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under mrl-train's
    ``evaluate=``): :func:`robustness_sets`' checks."""
    robustness_sets(cfg.get("robustness"), p)
