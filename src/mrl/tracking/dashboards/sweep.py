"""``mrl-report --wandb-report``: from a sweep's numbers and runs to a saved W&B report, or its spec.

The command hands over plain data (its tables as Markdown, the per-size numbers as points, the job
directories and which overrides the sweep varied); this module reads the training runs' keys and
config, logs the size-curve runs, builds the report, and saves it or (offline) writes the spec file.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.errors import MRLError
from mrl.tracking.dashboards.curves import curve_key, curves_of, log_curves
from mrl.tracking.dashboards.keys import LoggedRun, find_run_dirs, read_runs, server_runs, sizes, union

SPEC_NAME = "wandb_report.json"


@dataclass
class SweepInput:
    project: str
    group: str
    out: Path  # the report folder; the spec file and the size-curve runs go here
    title: str
    intro: str  # Markdown
    tables: str  # Markdown
    claims: str  # Markdown
    jobs: str  # Markdown
    points: list[tuple[str, int, str, int, float]]  # (method, seed, metric, size, value in [0, 1])
    metric_titles: dict[str, str]  # metric -> chart title, in the order of the charts
    entity: str | None = None
    runs_offline: bool = True  # the sweep's runs logged offline: its size-curve runs do too
    job_dirs: list[Path] = field(default_factory=list)  # local jobs (none: the runs come from the server)
    swept: list[str] | None = None  # override keys the jobs vary (None: any config key that varies)
    matters: Callable[[str], bool] = lambda key: True  # whether a config key can change the model


@dataclass
class Outcome:
    url: str | None  # the saved report
    spec: Path | None  # the spec file, when it was not saved
    reason: str | None  # why not (offline)
    curve_runs: list[Path]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = json.dumps(value, sort_keys=True, default=str)
    return out


def swept_keys(runs: list[LoggedRun], swept: list[str] | None, matters: Callable[[str], bool]) -> list[str]:
    """The config keys (leaves, as W&B stores them) whose values differ between the training runs: under
    the overrides the sweep varied (``head=mrl,mrl_e`` -> ``head.kind``), or, without that list, any key
    that can change the model and is not a path."""
    flats = [_flat(r.config) for r in runs]
    leaves = sorted({k for f in flats for k in f})
    varying = [k for k in leaves if len({f.get(k) for f in flats}) > 1 and matters(k)]
    if swept is None:
        return [k for k in varying if not any("/" in (f.get(k) or "") for f in flats)]
    return [k for k in varying if any(k == s or k.startswith(s + ".") for s in swept)]


def _training_runs(inp: SweepInput, reason: str | None) -> list[LoggedRun]:
    if inp.job_dirs:  # each job's own run directory (not its evaluations' runs under eval/)
        return read_runs(d for job in inp.job_dirs for d in find_run_dirs(job / "wandb", max_depth=1))
    if reason:
        return []
    try:
        return server_runs(inp.project, inp.entity, {"group": inp.group, "jobType": "train"})
    except Exception as err:  # wandb raises its own and requests' errors for network and auth failures
        raise MRLError(f"Cannot read the training runs of W&B group {inp.group!r} ({err}).") from None


def _val_keys(runs: list[LoggedRun]) -> list[str]:
    """Each size's best validation top-1 as the runs' summaries hold it (``val/acc@d.max`` where
    ``define_metric`` summarised it so), in numeric order of size."""
    summary = union(runs, "summary")
    out = []
    for d in sizes({k.removesuffix(".max").removesuffix(".last") for k in summary}, "val/acc"):
        key = f"val/acc@{d}"
        out.append(next(k for k in (f"{key}.max", key, f"{key}.last") if k in summary))
    return out


def build(inp: SweepInput, reason: str | None) -> tuple[Any, list[Path], str]:
    """The report, the size-curve run directories it aggregates and its ``report_id``."""
    from mrl.tracking.dashboards.report import SweepReport, sweep_report

    train = _training_runs(inp, reason)
    if inp.job_dirs and not train:
        raise MRLError(
            "--wandb-report found no W&B run in the jobs' wandb/ folders; the report's panels are built "
            "from the keys the runs logged. Did the jobs run with logger=wandb?"
        )
    report_id = secrets.token_hex(4)
    curve_dirs = log_curves(
        curves_of(inp.points),
        project=inp.project,
        group=inp.group,
        report_id=report_id,
        out_dir=inp.out,
        offline=inp.runs_offline or reason is not None,
        entity=inp.entity,
    )
    logged = union(read_runs(curve_dirs), "history")  # what the curve runs really hold
    job_types = sorted({r.job_type for r in train}) or ["train"]
    spec = SweepReport(
        project=inp.project,
        entity=inp.entity or "",
        group=inp.group,
        report_id=report_id,
        title=inp.title,
        intro=inp.intro,
        tables=inp.tables,
        claims=inp.claims,
        jobs=inp.jobs,
        curves=[(m, t) for m, t in inp.metric_titles.items() if curve_key(m) in logged],
        swept=swept_keys(train, inp.swept, inp.matters),
        val_keys=_val_keys(train),
        train_job_type=job_types[0],
    )
    return sweep_report(spec), curve_dirs, report_id


def wandb_sweep_report(inp: SweepInput) -> Outcome:
    """Build the report; save it when W&B is reachable with credentials, else write its spec file."""
    from mrl.tracking.dashboards.spec import document, offline_reason, save, write_document

    reason = offline_reason()  # decided before any API call
    report, curve_dirs, report_id = build(inp, reason)
    doc = document(
        report,
        "mrl-report --wandb-report",
        group=inp.group,
        report_id=report_id,
        size_curve_runs=[str(d.resolve()) for d in curve_dirs],
    )
    if reason is None:
        try:
            return Outcome(save(report, inp.entity), None, None, curve_dirs)
        except MRLError as err:  # kept as a spec, to be saved once the cause is fixed
            path = write_document(doc, inp.out / SPEC_NAME)
            raise MRLError(f"{err} Its spec is in {path} (mrl-dashboard --from-spec {path}).") from None
    return Outcome(None, write_document(doc, inp.out / SPEC_NAME), reason, curve_dirs)
