"""ImageFolder trees (``root/<split>/<class>/<image>``): the one listing, with its checks, that
``data=imagefolder``, ``mrl-prepare-data`` and the robustness sets share, so a tree one of them refuses
is refused by all of them, with the same words.

A tree is refused, before any image is read, when a split has no class folders, a class folder holds no
image files, the splits' class folders differ, a symbolic link is broken (its images would be skipped
without a word), or a folder or file is reached twice through links (a linked class folder would repeat
its images under a second label; a linked split would put the same images in training and validation).
Links to images elsewhere are fine. The order of the files is torchvision ``ImageFolder``'s (classes
sorted, then folders and files sorted), so its listings are unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from mrl.errors import MRLError

# the files a tree's class folders are searched for (torchvision's ImageFolder's); others are ignored
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)
SHOWN = 5  # names shown in a refusal before "and N more"


@dataclass(frozen=True)
class ClassFolders:
    """One class-per-folder tree (``folder/<class>/<image>``): its classes (sorted) and its image files
    ``(path, index into classes)``."""

    folder: Path
    classes: tuple[str, ...]
    samples: list[tuple[str, int]]


@dataclass
class _Seen:
    """What the listing of one tree (all its splits) has met: real folders, linked files, problems."""

    real_dirs: dict[str, str] = field(default_factory=dict)  # real path -> the path it was listed under
    linked_files: list[tuple[str, str]] = field(default_factory=list)  # (path, real path)
    realpaths: dict[str, str] = field(default_factory=dict)  # cache of os.path.realpath
    broken: list[str] = field(default_factory=list)
    twice: list[tuple[str, str]] = field(default_factory=list)  # (first path, second path)

    def real(self, path: str) -> str:
        if path not in self.realpaths:
            self.realpaths[path] = os.path.realpath(path)
        return self.realpaths[path]


def _shown(names: list[str]) -> str:
    more = f", and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def split_refusal(folder: Path, empty: str | None) -> str:
    """The refusal of a split without class folders (``empty`` None) or with empty class folders."""
    if empty is None:
        return (
            f"{folder} holds no class folders. Each split of an ImageFolder tree needs one folder of "
            "images per class, the same class folders as train/ (root/<split>/<class>/<image>)."
        )
    return (
        f"Class folder(s) {empty} in {folder} hold no image files ({', '.join(IMAGE_EXTENSIONS)}). Every "
        "class needs images in every split: add images, or remove the class folder from every split."
    )


def _entries(path: str | Path) -> list[os.DirEntry]:
    """A folder's entries; a folder that cannot be read is refused (os.walk, under ImageFolder, skipped
    it without a word)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as err:
        raise MRLError(
            f"Cannot list the folder {path} ({err.strerror or err}), so its images cannot be read. Make it "
            "readable (or remove it from the tree) and start again."
        ) from err


def _real_file(path: str, seen: _Seen) -> str:
    """The real path of a linked file: links followed, its folder resolved once per folder."""
    target = path
    for _ in range(40):  # a chain of links; the loop bound stops a cycle (then seen as broken)
        target = os.path.join(os.path.dirname(target), os.readlink(target))
        if not os.path.islink(target):
            break
    return os.path.join(seen.real(os.path.dirname(target)), os.path.basename(target))


def _class_files(class_dir: str, seen: _Seen) -> list[str] | None:
    """The image files under ``class_dir`` (links followed, in torchvision's order), None when the folder
    itself was met before; every broken link and every folder reached a second time is noted in
    ``seen``."""
    found: list[tuple[str, list[str]]] = []
    stack = [(class_dir, seen.real(class_dir))]
    while stack:
        path, real = stack.pop()
        if real in seen.real_dirs:  # a second way into one folder (a link, or a loop of links)
            seen.twice.append((seen.real_dirs[real], path))
            if path == class_dir:
                return None
            continue
        seen.real_dirs[real] = path
        names = []
        for entry in _entries(path):
            if entry.is_dir():
                sub = seen.real(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                stack.append((entry.path, sub))
            elif entry.is_symlink() and not entry.is_file():
                seen.broken.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                names.append(entry.name)
                if entry.is_symlink():
                    seen.linked_files.append((entry.path, _real_file(entry.path, seen)))
        found.append((path, sorted(names)))
    return [os.path.join(path, name) for path, names in sorted(found) for name in names]


@dataclass(frozen=True)
class _Listed:
    listing: ClassFolders
    empty: list[str]  # class folders without image files
    refusal: Callable[[str | None], str]


def _list(folder: Path, refusal: Callable[[str | None], str], seen: _Seen) -> _Listed:
    listed = _entries(folder)
    seen.broken.extend(e.path for e in listed if e.is_symlink() and not e.is_dir() and not e.is_file())
    classes = sorted(e.name for e in listed if e.is_dir())
    if not classes:
        raise MRLError(refusal(None))
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        files = _class_files(os.path.join(folder, name), seen)
        if files == []:
            empty.append(name)
        samples.extend((path, index) for path in files or ())
    return _Listed(ClassFolders(folder, tuple(classes), samples), empty, refusal)


def _check(root: Path, seen: _Seen, listed: list[_Listed]) -> None:
    """Refuse broken links, what the tree reaches twice (folders, then linked files), and empty class
    folders, in that order (a class folder of broken links is told as broken links)."""
    if seen.broken:
        raise MRLError(
            f"{root} holds {len(seen.broken)} broken symbolic link(s): {_shown(sorted(seen.broken))}. Their "
            "targets are gone, so their images would be missing without a word. Restore the targets or "
            "delete the links, then start again."
        )
    reals: dict[str, str] = {}
    for path, real in seen.linked_files:
        first = reals.setdefault(real, path)
        in_tree = seen.real_dirs.get(os.path.dirname(real))
        if first != path:
            seen.twice.append((first, path))
        elif in_tree is not None and real.lower().endswith(IMAGE_EXTENSIONS):
            seen.twice.append((os.path.join(in_tree, os.path.basename(real)), path))
    if seen.twice:
        pairs = [f"{b} is {a}" for a, b in seen.twice]
        raise MRLError(
            f"{root} reaches the same images twice through symbolic links: {_shown(pairs)}. Their images "
            "would be read twice: under a second label, or in two splits. Each class folder and image must "
            "appear once in the tree: replace the link by its own images, or remove it."
        )
    for item in listed:
        if item.empty:
            raise MRLError(item.refusal(_shown(item.empty)))


def list_classes(folder: Path, refusal: Callable[[str | None], str] | None = None) -> ClassFolders:
    """The listing of one class-per-folder tree with the checks of the module; ``refusal(empty)`` says
    what to fix when there are no class folders (``empty`` None) or empty ones (their names)."""
    seen = _Seen()
    listed = _list(Path(folder), refusal or (lambda empty: split_refusal(Path(folder), empty)), seen)
    _check(Path(folder), seen, [listed])
    return listed.listing


def list_tree(root: Path, splits: Mapping[str, Path]) -> dict[str, ClassFolders]:
    """Every split's listing (``splits``: name -> folder, ``train`` first; one folder may serve two
    splits), checked together: each split's class folders must be train's, and nothing may be reached
    twice across splits."""
    seen = _Seen()
    by_folder = {
        folder: _list(folder, lambda empty, f=folder: split_refusal(f, empty), seen)
        for folder in dict.fromkeys(splits.values())
    }
    _check(root, seen, list(by_folder.values()))
    listings = {split: by_folder[folder].listing for split, folder in splits.items()}
    classes = listings["train"].classes
    for split, listing in listings.items():
        missing = sorted(set(classes) - set(listing.classes))
        extra = sorted(set(listing.classes) - set(classes))
        if missing or extra:
            lacks = f"lacks train's class folder(s) {_shown(missing)}" if missing else ""
            has = f"has class folder(s) that train lacks: {_shown(extra)}" if extra else ""
            raise MRLError(
                f"The {split} split ({listing.folder}) {' and '.join(w for w in (lacks, has) if w)}. Every "
                "split needs the same class folders as train/, each holding images of its class: add "
                "them, or remove the class from every split."
            )
    return listings
