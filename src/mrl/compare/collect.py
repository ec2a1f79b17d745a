"""Find the jobs of a sweep and read what each one measured into flat records.

A job is a directory holding ``results.json`` (written by ``mrl-train``) and its
``resolved_config.yaml``; its ``eval/report.json`` (``mrl-train evaluate=...``, or an ``mrl-eval`` run
pointed there) adds 1-NN, mAP@10 and, for a standard model, the post-hoc SVD and truncation baselines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mrl.errors import MRLError

RESULTS = "results.json"
CONFIG = "resolved_config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
REPORT = Path("eval") / "report.json"
# Overrides that say which method/seed a job is, not which variant of the experiment it belongs to.
IDENTITY_KEYS = {"seed", "head", "head.kind", "head.dim", "+head", "resume"}
METRICS = ("top1", "1nn", "map@10")


@dataclass(frozen=True)
class Record:
    """One number: ``metric`` of ``method`` at ``size`` from one job (seed); values are fractions."""

    method: str
    size: int
    metric: str
    value: float
    seed: int
    job: str


def find_jobs(root: Path) -> list[Path]:
    """Every job directory under ``root`` (itself included), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise MRLError(
            f"{root} is not a directory. Give mrl-report the sweep directory of a multirun "
            "(logs/train/multiruns/<date>_<id>) or a folder of mrl-train run directories."
        )
    jobs = sorted({p.parent for p in root.rglob(RESULTS) if (p.parent / CONFIG).is_file()})
    if not jobs:
        raise MRLError(
            f"No mrl-train jobs under {root}: no directory there holds both {RESULTS} and {CONFIG}. Give the "
            "sweep directory of a finished multirun (a job writes its results.json at the end of training)."
        )
    return jobs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MRLError(f"Cannot read {path} ({err}); rerun that job or remove its directory.") from None


def _overrides(job: Path) -> list[str]:
    path = job / OVERRIDES
    if not path.is_file():
        return []
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def variant_labels(jobs: list[Path]) -> dict[Path, str]:
    """The overrides that tell the sweep's variants apart (besides method and seed), per job."""
    per_job = {
        job: [o for o in _overrides(job) if o.split("=", 1)[0].lstrip("+~") not in IDENTITY_KEYS]
        for job in jobs
    }
    common = set.intersection(*(set(v) for v in per_job.values())) if per_job else set()
    return {job: ",".join(o for o in ov if o not in common) for job, ov in per_job.items()}


def method_label(head: dict[str, Any]) -> str:
    """The method a job trained, from its head config: its kind, plus ``[w=...]`` when it weighted the
    sizes' losses unevenly (the paper's relative importance c_m), so such a run is its own row, not
    averaged with the plain MRL seeds."""
    kind = str(head.get("kind", "mrl"))
    weights = head.get("weights")
    if weights and len({float(w) for w in weights}) > 1:
        return f"{kind} [w={','.join(f'{float(w):g}' for w in weights)}]"
    return kind


def _pct_free(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def job_records(job: Path, variant: str = "") -> list[Record]:
    """The job's per-size numbers: trained heads' test top-1 (val when there was no test), and from its
    eval report 1-NN and mAP@10; for a standard model also its SVD and truncation baselines."""
    config = yaml.safe_load((job / CONFIG).read_text()) or {}
    head = config.get("head") or {}
    kind = str(head.get("kind", "mrl"))
    seed = int(config.get("seed", 0))
    base = method_label(head)
    method = f"{base} [{variant}]" if variant else base
    results = _read_json(job / RESULTS)
    records: list[Record] = []

    def add(m: str, size: Any, metric: str, value: Any) -> None:
        v = _pct_free(value)
        if v is not None:
            records.append(Record(m, int(size), metric, v, seed, str(job)))

    stage = "test" if any(k.startswith("test/acc@") for k in results) else "val"
    for key, value in results.items():
        if key.startswith(f"{stage}/acc@") and key.rsplit("@", 1)[1].isdigit():
            add(method, key.rsplit("@", 1)[1], "top1", value)
    if (job / REPORT).is_file():
        report = _read_json(job / REPORT)
        for size, row in (report.get("knn") or {}).items():
            add(method, size, "1nn", row.get("1nn"))
        for size, row in (report.get("retrieval") or {}).items():
            add(method, size, "map@10", row.get("map@10"))
        if kind == "standard":
            baselines = report.get("baselines") or {}
            suffix = f" [{variant}]" if variant else ""
            for name in ("svd", "slice"):
                for size, value in (baselines.get(name) or {}).items():
                    add(name + suffix, size, "top1", value)
                for size, value in (baselines.get(f"{name}_1nn") or {}).items():
                    add(name + suffix, size, "1nn", value)
    return records


def collect(root: Path) -> list[Record]:
    """All records of the sweep under ``root``."""
    jobs = find_jobs(root)
    labels = variant_labels(jobs)
    return [r for job in jobs for r in job_records(job, labels[job])]
