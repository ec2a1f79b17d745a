"""Where an evaluation's outputs live, and how the evaluations of a training run are found again.

Every evaluation is named after the checkpoint it evaluated, that checkpoint's content
(:func:`checkpoint_id`) *and* what it evaluated of it (:func:`evaluation_key`: the splits, sizes, data
settings and embedding dtype): two runs' ``last.ckpt`` (job ``0`` of two sweeps, say) never share a
place, a rerun with the same settings finds its exported embeddings again, a checkpoint that changed (a
resumed run overwrote ``last.ckpt``) gets a new place instead of replacing the old results, and so does
an evaluation of the same checkpoint on another split, other data or other sizes.

- ``mrl-train evaluate=...`` writes ``<job dir>/eval/<ckpt stem>-<id>_<key>/``;
- ``mrl-eval ckpt_path=<ckpt>`` writes ``<log dir>/eval/runs/<run dir name>_<ckpt stem>-<id>_<key>/`` and
  leaves a small link ``<job dir>/eval/<ckpt stem>-<id>_<key>.json`` naming it, so ``mrl-report`` finds
  every evaluation of a job's checkpoints from the job directory alone.

Each evaluation directory holds ``checkpoint.json``: which checkpoint it belongs to and what was
evaluated of it, the same record as report.json's ``checkpoint`` (both rewritten together when another
path to the same content is evaluated there). An evaluation refuses to write into a directory that
belongs to another checkpoint or to other evaluation settings.
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
from mrl.resolvers import evaluated_settings, evaluation_key

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


def evaluation_settings(cfg: Any) -> dict[str, Any]:
    """What an evaluation config (conf/eval.yaml, resolved) evaluates besides the checkpoint:
    :func:`mrl.resolvers.evaluated_settings` of its splits, sizes, data, embedding dtype and paper head."""
    return evaluated_settings(
        cfg.database_split, cfg.query_split, cfg.sizes, cfg.data, cfg.embedding_dtype, cfg.get("paper_head")
    )


def evaluation_name(ckpt_path: str | Path, ckpt_id: str, key: str | None = None) -> str:
    """``<ckpt stem>-<id>_<key>``: the evaluation's name inside its training job (``key``: the
    :func:`evaluation_key` of its settings; none in the names of earlier versions)."""
    return _safe(f"{Path(ckpt_path).stem}-{ckpt_id}" + (f"_{key}" if key else ""))


def standalone_dir_name(ckpt_path: str | Path, ckpt_id: str, key: str | None = None) -> str:
    """``<run dir name>_<ckpt stem>-<id>_<key>``: an ``mrl-eval`` output dir under ``<log dir>/eval/runs``
    (conf/eval.yaml builds the same name from ``${mrl_eval_name:}`` and ``${mrl_eval_key:}``)."""
    run = training_run_dir(ckpt_path).name
    name = evaluation_name(ckpt_path, ckpt_id, key)
    return _safe(f"{run}_{name}") if run else name


def after_training_dir(job_dir: Path, ckpt_path: str | Path, ckpt_id: str, key: str | None = None) -> Path:
    """Where ``mrl-train evaluate=...`` puts the evaluation of ``ckpt_path`` with settings ``key``."""
    return Path(job_dir) / EVAL_SUBDIR / evaluation_name(ckpt_path, ckpt_id, key)


def checkpoint_record(
    ckpt_path: str | Path, ckpt_id: str, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``checkpoint.json`` and ``report.json`` say about the evaluated checkpoint, and with
    ``settings`` (:func:`evaluation_settings`) what was evaluated of it and its key."""
    ckpt = Path(ckpt_path).absolute()
    record: dict[str, Any] = {"path": str(ckpt), "id": ckpt_id, "run_dir": str(training_run_dir(ckpt))}
    if settings is not None:
        record["evaluated"] = {**settings, "key": evaluation_key(settings)}
    return record


def _read_record(record_path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _differences(owner: dict[str, Any], settings: dict[str, Any]) -> str:
    """``query_split=val (there: test), ...``: how ``settings`` differ from those ``owner`` recorded."""
    held = owner.get("evaluated") or {}
    return ", ".join(
        f"{key}={json.dumps(value)} (there: {json.dumps(held.get(key))})"
        for key, value in settings.items()
        if held.get(key) != value
    )


def check_output_dir(
    out_dir: Path, ckpt_path: str | Path, ckpt_id: str, settings: dict[str, Any] | None = None
) -> None:
    """Raise :class:`MRLError` when ``out_dir`` already holds the results of a different checkpoint, of
    this checkpoint evaluated with other ``settings`` (:func:`evaluation_settings`; not checked when
    None), or results it cannot attribute to any checkpoint."""
    out_dir = Path(out_dir)
    record_path = out_dir / CHECKPOINT_RECORD
    if record_path.is_file():
        owner = _read_record(record_path)
        if owner.get("id") == ckpt_id:
            recorded = (owner.get("evaluated") or {}).get("key")
            if settings is None or recorded is None or recorded == evaluation_key(settings):
                return
            raise MRLError(
                f"{out_dir} holds an evaluation of this checkpoint with other settings "
                f"({_differences(owner, settings)}); its results are left as they are. Leave "
                "hydra.run.dir at its default (one directory per checkpoint and settings) or choose an "
                "empty directory."
            )
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


def claim_output_dir(out_dir: Path, record: dict[str, Any]) -> None:
    """Make ``out_dir`` the place of the evaluation ``record`` (:func:`checkpoint_record` with its
    settings) describes, after :func:`check_output_dir`. A directory that already has a record keeps it
    until :func:`record_evaluation` replaces it beside the new report."""
    settings = {k: v for k, v in record["evaluated"].items() if k != "key"}
    check_output_dir(out_dir, record["path"], record["id"], settings)
    record_path = Path(out_dir) / CHECKPOINT_RECORD
    if not record_path.is_file():
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")


def record_evaluation(out_dir: Path, record: dict[str, Any]) -> None:
    """``checkpoint.json`` as report.json's ``checkpoint`` says (called right after the report is
    written): another path to the same content evaluated here is recorded in both, never in one."""
    record_path = Path(out_dir) / CHECKPOINT_RECORD
    if _read_record(record_path) != record:
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")


def link_to_training_run(eval_dir: Path, record: dict[str, Any]) -> Path | None:
    """Leave ``<job>/eval/<ckpt stem>-<id>_<key>.json`` naming ``eval_dir`` (an evaluation written
    elsewhere; ``record``: its :func:`checkpoint_record`), so the job's evaluations can be found from the
    job. A read-only job dir only costs a warning."""
    ckpt_path, ckpt_id = record["path"], record["id"]
    job_dir = training_run_dir(ckpt_path)
    key = (record.get("evaluated") or {}).get("key")
    link = job_dir / EVAL_SUBDIR / f"{evaluation_name(ckpt_path, ckpt_id, key)}.json"
    if Path(eval_dir).absolute() == link.with_suffix("").absolute():
        return None  # the evaluation is inside the job already
    try:
        payload = {**record, "eval_dir": str(Path(eval_dir).absolute())}
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
