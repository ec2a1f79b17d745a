"""Quality against bytes per stored vector: mAP@10 and 1-NN of every method and storage format of a
sweep, placed at the bytes one stored vector takes (``mrl.eval.sparse_codes.prefix_bytes``), seeds
aggregated, and the best method at each byte budget.

A line is a method and a format (``mrl (int8)``, ``svd (float32)``): the model's prefixes in each
format its evaluation's ``quantized`` section measured (float32 from the kNN and retrieval sections
when it did not run) and, for a standard model, the post-hoc SVD and truncation baselines as float32
(their 1-NN; they have no mAP@10). A CSR model (``head=csr``) is its own line, ``csr (float32)`` and
``csr (float16)``: its sparse codes at the bytes its report gives them (``bytes.csr``: ``k`` values
and ``k`` unit indices, ``mrl.eval.sparse_codes.sparse_code_bytes``), one point per ``k``. The best
method at a budget of B bytes is the line point with the highest mean among those that store a vector
in B bytes or fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrl.compare.collect import (
    Record,
    as_number,
    comparable_reports,
    comparable_setting,
    find_jobs,
    job_evaluations,
    method_label,
    read_config,
    variant_labels,
)
from mrl.compare.table import METRIC_TITLES, Cell, aggregate
from mrl.eval.sparse_codes import prefix_bytes

BYTES_METRICS = ("map@10", "1nn")
FLOAT32 = "float32"
# one marker per storage format (the colour says the method)
FORMAT_MARKERS = {"float32": "o", "float16": "D", "int8": "s", "binary": "^"}

Tables = dict[str, dict[str, dict[int, Cell]]]


@dataclass(frozen=True)
class Best:
    """The best line at a budget: the highest mean of ``metric`` stored in ``budget`` bytes or fewer."""

    metric: str
    budget: int
    method: str  # "<method> (<format>)"
    bytes: int  # the bytes of the point chosen (at most the budget)
    mean: float
    std: float
    n: int


def line_label(method: str, fmt: str) -> str:
    return f"{method} ({fmt})"


def report_records(
    report: dict[str, Any], method: str, kind: str, suffix: str, seed: int, job: str
) -> list[Record]:
    """The points of one evaluation report: ``Record``\\ s whose ``size`` is the bytes per vector and
    whose ``method`` names the line (method and format)."""
    out: list[Record] = []
    # a CSR model's codes: their bytes as its report counted them (they depend on the code's width)
    codes = ((report.get("bytes") or {}).get("csr") or {}) if kind == "csr" else None

    def add(name: str, fmt: str, d: Any, metric: str, value: Any) -> None:
        v = as_number(value)
        if v is None or not str(d).isdigit():
            return
        size = prefix_bytes(int(d), fmt) if codes is None else (codes.get(fmt) or {}).get(str(d))
        if size is not None:
            out.append(Record(line_label(name, fmt), int(size), metric, v, seed, job))

    quantized = report.get("quantized") or {}
    for fmt, per_size in quantized.items():
        for d, row in per_size.items():
            for metric in BYTES_METRICS:
                add(method, fmt, d, metric, (row or {}).get(metric))
    if not quantized:
        for d, row in (report.get("knn") or {}).items():
            add(method, FLOAT32, d, "1nn", (row or {}).get("1nn"))
        for d, row in (report.get("retrieval") or {}).items():
            add(method, FLOAT32, d, "map@10", (row or {}).get("map@10"))
    if kind == "standard":
        baselines = report.get("baselines") or {}
        for name in ("svd", "slice"):
            for d, value in (baselines.get(f"{name}_1nn") or {}).items():
                add(name + suffix, FLOAT32, d, "1nn", value)
    return out


def collect_bytes(root: Path) -> list[Record]:
    """The points of every job under ``root`` from its evaluations with the sweep's splits and data (as
    ``collect_jobs`` reads them: the newest, older ones of its checkpoint for the sizes it lacks)."""
    jobs = find_jobs(Path(root))
    labels = variant_labels(jobs)
    evaluations = {job: job_evaluations(job) for job in jobs}
    setting = comparable_setting([e.setting for e in per_job] for per_job in evaluations.values())
    records: list[Record] = []
    for job in jobs:
        used = comparable_reports(evaluations[job], setting)
        if not used:
            continue
        config = read_config(job)
        head = config.get("head") or {}
        suffix = f" [{labels[job]}]" if labels[job] else ""
        method = method_label(head, config.get("objective")) + suffix
        kind = str(head.get("kind", "mrl"))
        seed = int(config.get("seed", 0))
        seen: set[tuple[str, int, str]] = set()
        for evaluation in used:
            for r in report_records(evaluation.report, method, kind, suffix, seed, str(job)):
                if (r.method, r.size, r.metric) not in seen:
                    seen.add((r.method, r.size, r.metric))
                    records.append(r)
    return records


def bytes_tables(records: list[Record]) -> Tables:
    """``{metric: {line: {bytes: Cell}}}`` for mAP@10 and 1-NN, seeds aggregated (mean, sample std)."""
    tables = aggregate(records)
    return {metric: tables.get(metric, {}) for metric in BYTES_METRICS}


def best_at_budgets(tables: Tables) -> list[Best]:
    """Per metric and budget (every bytes value a line has), the best line within the budget; equal
    means: the first line in the table's (the paper's) order, then the fewer bytes."""
    best = []
    for metric, table in tables.items():
        for budget in sorted({b for row in table.values() for b in row}):
            points = [
                (cell.mean, -b, line) for line, row in table.items() for b, cell in row.items() if b <= budget
            ]
            top = max(p[0] for p in points)
            _, neg_bytes, line = next(p for p in points if p[0] == top)
            cell = table[line][-neg_bytes]
            best.append(Best(metric, budget, line, -neg_bytes, cell.mean, cell.std, cell.n))
    return best


def _cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    return f"{cell.mean:.2f} ± {cell.std:.2f}" if cell.n > 1 else f"{cell.mean:.2f}"


def bytes_markdown(tables: Tables, best: list[Best]) -> str:
    """The table (one row per line and bytes value) and the best line at each budget."""
    titles = [METRIC_TITLES[m] for m in BYTES_METRICS]
    lines = [
        "**Quality against bytes per stored vector**, mean ± sample std over seeds\n",
        "| method (format) | bytes | " + " | ".join(titles) + " |",
        "|---|---:|" + "---:|" * len(titles),
    ]
    keys = dict.fromkeys(
        (line, b) for m in BYTES_METRICS for line, row in tables[m].items() for b in sorted(row)
    )
    for line, b in keys:
        cells = [_cell(tables[m].get(line, {}).get(b)) for m in BYTES_METRICS]
        lines.append(f"| {line} | {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Best at each budget** (the highest mean among the points stored in that many bytes or fewer)\n",
        "| budget (bytes) | metric | best method (format) | its bytes | value (%) |",
        "|---:|---|---|---:|---:|",
    ]
    for b in best:
        cell = Cell(b.mean, b.std, b.n)
        lines.append(f"| {b.budget} | {METRIC_TITLES[b.metric]} | {b.method} | {b.bytes} | {_cell(cell)} |")
    return "\n".join(lines) + "\n"


def write_bytes_figure(tables: Tables, path: Path) -> Path:
    """Two panels, mAP@10 and 1-NN against bytes per vector (log-2 axis): one line per method and
    format (colour: method, marker: format), error bars the seeds' std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrl.tracking.charts import save_figure

    methods = list(dict.fromkeys(line.rsplit(" (", 1)[0] for t in tables.values() for line in t))
    fig, axes = plt.subplots(1, len(BYTES_METRICS), figsize=(11, 4.2), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], BYTES_METRICS, strict=True):
        for line, row in tables[metric].items():
            method, _, fmt = line.rpartition(" (")
            xs = sorted(row)
            ax.errorbar(
                xs,
                [row[b].mean for b in xs],
                yerr=[row[b].std for b in xs],
                label=line,
                color=f"C{methods.index(method) % 10}",
                marker=FORMAT_MARKERS.get(fmt.rstrip(")"), "."),
                capsize=2,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per stored vector")
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.grid(True, alpha=0.3)
    # one legend for both panels: the baselines' lines are in the 1-NN panel only
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.suptitle("Quality against bytes per vector (colour: method, marker: storage format)")
    return save_figure(fig, path)


def bytes_json(tables: Tables, best: list[Best]) -> dict[str, Any]:
    """``comparison.json``'s ``quality_vs_bytes``: per metric, line and bytes the seeds' cell; the best."""
    from dataclasses import asdict

    from mrl.compare.table import to_json

    return {"tables": to_json(tables), "best": [asdict(b) for b in best]}


def bytes_wandb(tables: Tables, best: list[Best], png: Path) -> dict[str, Any]:
    """The report run's ``report/quality_vs_bytes`` table, its mAP@10 chart, the figure and the best."""
    import wandb

    rows = []
    for line in dict.fromkeys(line for t in tables.values() for line in t):
        method, _, fmt = line.rpartition(" (")
        for b in sorted({b for m in BYTES_METRICS for b in tables[m].get(line, {})}):
            cells = [tables[m].get(line, {}).get(b) for m in BYTES_METRICS]
            rows.append([line, method, fmt.rstrip(")"), b, *[c.mean if c else None for c in cells]])
    table = wandb.Table(columns=["line", "method", "format", "bytes", *BYTES_METRICS], data=rows)
    return {
        "report/quality_vs_bytes": table,
        "report/quality_vs_bytes_chart": wandb.plot.line(
            table, "bytes", "map@10", stroke="line", title="mAP@10 (%) vs bytes per vector"
        ),
        "report/quality_vs_bytes_png": wandb.Image(str(png)),
        "report/best_at_budget": wandb.Table(
            columns=["metric", "budget", "method", "bytes", "mean", "std", "seeds"],
            data=[[b.metric, b.budget, b.method, b.bytes, b.mean, b.std, b.n] for b in best],
        ),
    }
