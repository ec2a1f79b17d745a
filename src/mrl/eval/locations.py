"""Where an evaluation's outputs live, and how the evaluations of a training run are found again.

Every evaluation is named after the checkpoint it evaluated *and* that checkpoint's content
(:func:`checkpoint_id`): two runs' ``last.ckpt`` (job ``0`` of two sweeps, say) never share a place,
a rerun on the same checkpoint finds its exported embeddings again, and a checkpoint that changed
(a resumed run overwrote ``last.ckpt``) gets a new place instead of replacing the old results.

- ``mrl-train evaluate=...`` writes ``<job dir>/eval/<ckpt stem>-<id>/``;
- ``mrl-eval ckpt_path=<ckpt>`` writes ``<log dir>/eval/runs/<run dir name>_<ckpt stem>-<id>/`` and
  leaves a small link ``<job dir>/eval/<ckpt stem>-<id>.json`` naming it, so ``mrl-report`` finds every
  evaluation of a job's checkpoints from the job directory alone.

Each evaluation directory holds ``checkpoint.json`` (which checkpoint it belongs to); an evaluation
refuses to write into a directory that belongs to another checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from mrl.errors import MRLError
from mrl.files import atomic_write_text

log = logging.getLogger(__name__)

EVAL_SUBDIR = "eval"
CHECKPOINT_RECORD = "checkpoint.json"
REPORT = "report.json"
ID_CHARS = 10
CHECKPOINT_DIR_NAME = "checkpoints"


def checkpoint_id(path: str | Path) -> str:
    """A short content hash of the checkpoint file (SHA-256, streamed; computed once per file version)."""
    stat = os.stat(path)
    return _content_id(str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _content_id(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key only, so a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()[:ID_CHARS]


def training_run_dir(ckpt_path: str | Path) -> Path:
    """The ``mrl-train`` job directory a checkpoint belongs to (``<job>/checkpoints/<name>.ckpt``)."""
    ckpt = Path(ckpt_path).absolute()
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR_NAME else ckpt.parent


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def evaluation_name(ckpt_path: str | Path, ckpt_id: str) -> str:
    """``<ckpt stem>-<id>``: the evaluation's name inside its training job."""
    return _safe(f"{Path(ckpt_path).stem}-{ckpt_id}")


def standalone_dir_name(ckpt_path: str | Path, ckpt_id: str) -> str:
    """``<run dir name>_<ckpt stem>-<id>``: an ``mrl-eval`` output dir under ``<log dir>/eval/runs``."""
    run = training_run_dir(ckpt_path).name
    name = evaluation_name(ckpt_path, ckpt_id)
    return _safe(f"{run}_{name}") if run else name


def after_training_dir(job_dir: Path, ckpt_path: str | Path, ckpt_id: str) -> Path:
    """Where ``mrl-train evaluate=...`` puts the evaluation of ``ckpt_path``."""
    return Path(job_dir) / EVAL_SUBDIR / evaluation_name(ckpt_path, ckpt_id)


def checkpoint_record(ckpt_path: str | Path, ckpt_id: str) -> dict[str, Any]:
    """What ``checkpoint.json`` and ``report.json`` say about the evaluated checkpoint."""
    ckpt = Path(ckpt_path).absolute()
    return {"path": str(ckpt), "id": ckpt_id, "run_dir": str(training_run_dir(ckpt))}


def check_output_dir(out_dir: Path, ckpt_path: str | Path, ckpt_id: str) -> None:
    """Raise :class:`MRLError` when ``out_dir`` already holds the results of a different checkpoint (or
    results it cannot attribute to any checkpoint)."""
    out_dir = Path(out_dir)
    record_path = out_dir / CHECKPOINT_RECORD
    if record_path.is_file():
        try:
            owner = json.loads(record_path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("id") == ckpt_id:
            return
        raise MRLError(
            f"{out_dir} holds the evaluation of another checkpoint ({owner.get('path', 'unknown')}, id "
            f"{owner.get('id', '?')}), not of {ckpt_path} (id {ckpt_id}); nothing was written. Leave "
            "hydra.run.dir at its default (one directory per checkpoint) or choose an empty directory."
        )
    if (out_dir / REPORT).is_file():
        raise MRLError(
            f"{out_dir} already holds an evaluation report without a record of its checkpoint, so it "
            "may belong to another model; nothing was written. Choose an empty directory with "
            "hydra.run.dir=<dir>, or move that report away."
        )


def claim_output_dir(out_dir: Path, ckpt_path: str | Path, ckpt_id: str) -> None:
    """Make ``out_dir`` the place of this checkpoint's evaluation (after :func:`check_output_dir`)."""
    check_output_dir(out_dir, ckpt_path, ckpt_id)
    record_path = Path(out_dir) / CHECKPOINT_RECORD
    if not record_path.is_file():
        atomic_write_text(record_path, json.dumps(checkpoint_record(ckpt_path, ckpt_id), indent=2) + "\n")


def link_to_training_run(eval_dir: Path, ckpt_path: str | Path, ckpt_id: str) -> Path | None:
    """Leave ``<job>/eval/<ckpt stem>-<id>.json`` naming ``eval_dir`` (an evaluation written elsewhere),
    so the job's evaluations can be found from the job. A read-only job dir only costs a warning."""
    job_dir = training_run_dir(ckpt_path)
    link = job_dir / EVAL_SUBDIR / f"{evaluation_name(ckpt_path, ckpt_id)}.json"
    if Path(eval_dir).absolute() == link.with_suffix("").absolute():
        return None  # the evaluation is inside the job already
    try:
        payload = {**checkpoint_record(ckpt_path, ckpt_id), "eval_dir": str(Path(eval_dir).absolute())}
        return atomic_write_text(link, json.dumps(payload, indent=2) + "\n")
    except OSError as err:
        log.warning(
            "Could not record this evaluation in the training run (%s: %s); mrl-report on that run "
            "will not find it.",
            link,
            err.strerror or err,
        )
        return None


def find_evaluations(job_dir: Path) -> list[Path]:
    """Every ``report.json`` of the evaluations of ``job_dir``'s checkpoints, newest first.

    Looks in ``<job>/eval/*/`` (``evaluate=``), follows the links ``mrl-eval`` left in ``<job>/eval/``,
    and reads ``<job>/eval/report.json`` (the layout of earlier versions).
    """
    eval_root = Path(job_dir) / EVAL_SUBDIR
    if not eval_root.is_dir():
        return []
    reports = {p.resolve() for p in eval_root.glob(f"*/{REPORT}")}
    if (eval_root / REPORT).is_file():
        reports.add((eval_root / REPORT).resolve())
    for link in eval_root.glob("*.json"):
        if link.name == REPORT:
            continue
        try:
            target = Path(json.loads(link.read_text())["eval_dir"]) / REPORT
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if target.is_file():
            reports.add(target.resolve())
    return sorted(reports, key=lambda p: (os.stat(p).st_mtime_ns, str(p)), reverse=True)
