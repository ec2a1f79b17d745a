"""The sweep report (a W&B report) that ``mrl-report --wandb-report`` builds.

Its accuracy-vs-size charts are W&B's own grouped line plots: W&B aggregates only across runs, so
``mrl-report`` logs one small run per method and seed (job type ``size-curves``, see
:mod:`mrl.tracking.dashboards.curves`) whose history has one row per size (``size``, ``by_size/top1``,
``by_size/1nn``, ``by_size/map@10``), and each chart groups those runs by their ``method`` config: one
line per method, the mean over its seeds with the min-max range as a band, on a log x axis like the
paper's figures. The comparison tables, claim checks and job list are the same Markdown
``mrl-report`` writes to ``comparison.md``; a parallel-coordinates panel puts the swept settings of the
sweep's training runs beside their best validation accuracy per size, and a run comparer lists them
side by side.

Runsets are built without their project: resolving it is an API call (the project's internal id),
made by :func:`mrl.tracking.dashboards.spec.save` just before the report is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import wandb_workspaces.reports.v2 as wr

from mrl.tracking.dashboards.curves import CURVE_JOB_TYPE, SIZE_KEY, curve_key

WIDE = 24  # a report's panel grid is 24 units wide


@dataclass
class SweepReport:
    """What the report shows; every key in it was read from the runs (see ``mrl.compare.job``)."""

    project: str
    group: str
    report_id: str  # the ``report_id`` config of this report's size-curve runs
    title: str
    intro: str  # Markdown
    tables: str  # Markdown: the comparison tables (methods x sizes, mean ± std over seeds)
    claims: str  # Markdown: the claim checks
    jobs: str = ""  # Markdown: every job and where its numbers came from
    curves: list[tuple[str, str]] = field(default_factory=list)  # (metric, chart title), in this order
    swept: list[str] = field(default_factory=list)  # config keys of the training runs that the sweep varied
    val_keys: list[str] = field(default_factory=list)  # summary keys, one per size, in numeric order
    train_job_type: str = "train"
    entity: str = ""


def _quote(value: str) -> str:
    return repr(str(value))  # a Python string literal: the runset filter language parses Python


def _curves_grid(r: SweepReport) -> wr.PanelGrid:
    runset = wr.Runset(
        name="size curves (one run per method and seed)",
        filters=(
            f"Metric('Group') = {_quote(r.group)} and Metric('JobType') = {_quote(CURVE_JOB_TYPE)} "
            f"and Config('report_id') = {_quote(r.report_id)}"
        ),
        groupby=["config.method"],
    )
    panels = [
        wr.LinePlot(
            title=f"{title}: mean over seeds, min-max band",
            x=SIZE_KEY,
            y=[curve_key(metric)],
            log_x=True,
            title_x="embedding size d",
            title_y=title,
            groupby=wr.Config("method"),
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
            layout=wr.Layout(x=(i % 2) * WIDE // 2, y=(i // 2) * 8, w=WIDE // 2, h=8),
        )
        for i, (metric, title) in enumerate(r.curves)
    ]
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _runs_grid(r: SweepReport) -> wr.PanelGrid:
    runset = wr.Runset(
        name="training runs of the sweep",
        filters=f"Metric('Group') = {_quote(r.group)} and Metric('JobType') = {_quote(r.train_job_type)}",
    )
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in r.swept]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(k)) for k in r.val_keys]
    panels = [
        wr.ParallelCoordinatesPlot(
            title="swept settings vs best validation top-1 per size",
            columns=columns,
            layout=wr.Layout(x=0, y=0, w=WIDE, h=9),
        ),
        wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=9, w=WIDE, h=12)),
    ]
    return wr.PanelGrid(runsets=[runset], panels=panels)


def sweep_report(r: SweepReport) -> wr.Report:
    """The report of one sweep (entity may stay empty until it is saved)."""
    blocks: list = [wr.MarkdownBlock(text=r.intro)]
    if r.curves:
        blocks += [
            wr.H2(text="Accuracy vs embedding size"),
            wr.P(
                text="One line per method: the mean over its seeds, with the range from the lowest to "
                "the highest seed as a band (W&B groups this report's size-curve runs by method)."
            ),
            _curves_grid(r),
        ]
    blocks += [wr.H2(text="Comparison tables"), wr.MarkdownBlock(text=r.tables)]
    blocks += [wr.H2(text="Claims"), wr.MarkdownBlock(text=r.claims)]
    blocks += [
        wr.H2(text="Swept settings and the runs side by side"),
        _runs_grid(r),
    ]
    if r.jobs:
        blocks += [wr.H2(text="Jobs"), wr.MarkdownBlock(text=r.jobs)]
    return wr.Report(
        project=r.project,
        entity=r.entity,
        title=r.title[:128],
        description=f"mrl-report of W&B group {r.group}",
        blocks=blocks,
        width="fluid",
    )
