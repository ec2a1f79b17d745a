"""Result files appear whole or not at all, with the permissions the user's umask gives new files.

One writer for every result file (``results.json``, ``report.json``, plots, exported embeddings,
``model.safetensors``, checkpoints): write a hidden temporary file beside the target, flush it to disk,
give it the umask's mode and rename it into place. A reader (or a run killed half-way, or a full disk)
never sees a partial file under the real name. ``tempfile.mkstemp`` alone would leave the file 0600,
unreadable to colleagues sharing the file system.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    The temporary file is fsynced before the rename (a crash cannot leave an empty file under the
    real name) and removed when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers never see half of it."""
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
