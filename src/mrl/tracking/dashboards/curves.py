"""Size-curve runs: one small W&B run per method and seed whose history is accuracy against size.

W&B draws a line from a run's history and aggregates only across runs (grouped by a config key), so the
paper's figure (accuracy vs embedding size, one line per method, seeds averaged) needs the sweep's
per-size numbers as history rows keyed by size. ``mrl-report --wandb-report`` logs them here, in the
sweep's group with job type ``size-curves``: ``size`` and ``by_size/<metric>`` (``top1``, ``1nn``,
``map@10``; in percent, as the comparison tables beside them), one row per size in increasing order, and
the config ``{method, seed, report_id}`` the report's runset filters and groups by. Every number of the
comparison lands in exactly one curve run, so W&B's mean over a method's runs is the table's mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CURVE_JOB_TYPE = "size-curves"
SIZE_KEY = "size"
PREFIX = "by_size/"


def curve_key(metric: str) -> str:
    return PREFIX + metric


@dataclass
class Curve:
    """The numbers of one method and seed: ``values[metric][size]`` (fractions, as the records hold them)."""

    method: str
    seed: int
    values: dict[str, dict[int, float]] = field(default_factory=dict)

    def sizes(self) -> list[int]:
        return sorted({d for per_size in self.values.values() for d in per_size})


def curves_of(points: list[tuple[str, int, str, int, float]]) -> list[Curve]:
    """Curves from ``(method, seed, metric, size, value)`` points: one per method and seed, plus another
    when the same method, seed, metric and size occur twice (a repeated job still counts once each)."""
    curves: list[Curve] = []
    for method, seed, metric, size, value in points:
        for curve in curves:
            if curve.method == method and curve.seed == seed and size not in curve.values.get(metric, {}):
                break
        else:
            curve = Curve(method, seed)
            curves.append(curve)
        curve.values.setdefault(metric, {})[size] = value
    return curves


def log_curves(
    curves: list[Curve],
    *,
    project: str,
    group: str,
    report_id: str,
    out_dir: Path,
    offline: bool,
    entity: str | None = None,
) -> list[Path]:
    """Log every curve as its own W&B run under ``out_dir``; return the run directories."""
    import wandb

    dirs = []
    for curve in curves:
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=CURVE_JOB_TYPE,
            name=f"{curve.method} seed={curve.seed}",
            config={"method": curve.method, "seed": curve.seed, "report_id": report_id},
            mode="offline" if offline else "online",
            dir=str(out_dir),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True),
        )
        try:
            run.define_metric(SIZE_KEY)
            run.define_metric(PREFIX + "*", step_metric=SIZE_KEY)
            for d in curve.sizes():
                row = {curve_key(m): 100.0 * v[d] for m, v in curve.values.items() if d in v}
                run.log({SIZE_KEY: d, **row})
            dirs.append(Path(run.dir).parent)
        finally:
            wandb.finish()
    return dirs
