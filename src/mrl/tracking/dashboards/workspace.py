"""The project workspace (a saved W&B view), built from the keys the project's runs logged.

W&B's default workspace makes one panel per key, sorted as text (``acc@1, acc@128, acc@16, acc@2``).
This one groups them by what a Matryoshka run is read for, in that order: every size's top-1 curve in
one chart per stage, the final accuracy per size, the loss per size, top-5, the learning rate and the
system. Sizes are in numeric order within every chart, and a panel is only made for keys some run
logged (W&B's automatic panels are off, so nothing else is added behind them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from mrl.tracking.dashboards.keys import LoggedRun, sizes, union

EPOCH = "epoch"
STEP = "trainer/global_step"
PROCESS_TIME = "RelativeTime(Process)"  # W&B's name for the x axis of its own system charts
# system metrics W&B records for every run (``stats`` records), grouped into charts; a chart lists the
# keys of its family that some run recorded, GPUs in index order
SYSTEM_CHARTS = (
    ("GPU utilisation (%)", r"gpu\.\d+\.gpu"),
    ("GPU memory allocated (%)", r"gpu\.\d+\.memoryAllocated"),
    ("GPU power (W)", r"gpu\.\d+\.powerWatts"),
    ("CPU (%)", r"cpu"),
    ("memory (%)", r"memory_percent|proc\.memory\.percent"),
    ("process memory (MB)", r"proc\.memory\.rssMB"),
)


def per_size(keys: set[str], prefix: str) -> list[str]:
    """``<prefix>@<d>`` for every size some run logged, in numeric order of ``d``."""
    return [f"{prefix}@{d}" for d in sizes(keys, prefix)]


def _line(title: str, y: list[str], x: str = EPOCH, **kwargs) -> wr.LinePlot:
    kwargs.setdefault("title_x", x)
    return wr.LinePlot(title=title, x=x, y=y, **kwargs)


def _bars(title: str, metrics: list[str]) -> wr.BarPlot:
    # one bar per size (left to right in numeric order) for every run: evenly spaced sizes, which for a
    # nesting list of doublings is the log-2 axis of the paper's figures
    return wr.BarPlot(title=title, metrics=metrics, orientation="v", title_x="embedding size")


def _accuracy(history: set[str]) -> list:
    panels = []
    for stage, what in (("val", "validation"), ("train", "training")):
        keys = per_size(history, f"{stage}/acc")
        if keys:
            panels.append(_line(f"{what} top-1 accuracy, every size (acc@d)", keys, title_y="top-1 accuracy"))
    return panels


def _final(history: set[str]) -> list:
    for stage, what in (("test", "test"), ("val", "validation")):
        keys = per_size(history, f"{stage}/acc")
        if keys:
            return [_bars(f"final {what} top-1 accuracy vs embedding size, per run", keys)]
    return []


def _loss(history: set[str]) -> list:
    panels = []
    for stage, what in (("val", "validation"), ("train", "training")):
        keys = per_size(history, f"{stage}/loss")
        if keys:
            panels.append(_line(f"{what} loss per size", keys, title_y="cross-entropy"))
    totals = [(k, x) for k, x in (("train/loss", STEP), ("val/loss", EPOCH)) if k in history]
    panels += [_line(f"{k} (weighted sum over sizes)", [k], x=x) for k, x in totals]
    return panels


def _top5(history: set[str]) -> list:
    panels = []
    if keys := per_size(history, "val/top5"):
        panels.append(_line("validation top-5 accuracy, every size", keys, title_y="top-5 accuracy"))
    if keys := per_size(history, "test/top5"):
        panels.append(_bars("final test top-5 accuracy vs embedding size, per run", keys))
    return panels


def _lr(history: set[str]) -> list:
    return [_line("learning rate (per step)", ["train/lr"], x=STEP)] if "train/lr" in history else []


def _system(system: set[str]) -> list:
    def index(key: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in key.split("."))

    panels = []
    for title, pattern in SYSTEM_CHARTS:
        keys = sorted((k for k in system if re.fullmatch(pattern, k.removeprefix("system/"))), key=index)
        if keys:
            panels.append(_line(title, keys, x=PROCESS_TIME, title_x="time since the run started (s)"))
    return panels


def _section(name: str, panels: list, x_axis: str = EPOCH, is_open: bool = True) -> ws.Section:
    return ws.Section(
        name=name,
        panels=panels,
        is_open=is_open,
        layout_settings=ws.SectionLayoutSettings(columns=2, rows=2),
        panel_settings=ws.SectionPanelSettings(x_axis=x_axis),
    )


def project_workspace(
    runs: Iterable[LoggedRun], project: str, entity: str = "", name: str = ""
) -> ws.Workspace:
    """The workspace of ``project`` for the keys ``runs`` logged (sections without keys are left out)."""
    runs = list(runs)
    history = union(runs, "history")
    sections = [
        _section("Top-1 accuracy per size", _accuracy(history)),
        _section("Final accuracy vs embedding size", _final(history)),
        _section("Loss per size", _loss(history)),
        _section("Top-5 accuracy per size", _top5(history)),
        _section("Learning rate", _lr(history), STEP),
        _section("System", _system(union(runs, "system")), PROCESS_TIME, is_open=False),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"mrl: {project}, every size in numeric order",
        sections=[s for s in sections if s.panels],
    )
