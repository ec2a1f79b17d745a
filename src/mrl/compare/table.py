"""Aggregate a sweep's records over seeds into methods x sizes tables, and write them as Markdown/JSON."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from mrl.compare.collect import METRICS, JobInfo, Record

# The paper's order; anything else (variants) follows alphabetically.
METHOD_ORDER = ("mrl", "mrl_e", "mrl+supcon", "mrl+infonce", "ff", "standard", "svd", "slice")
METRIC_TITLES = {
    "top1": "Top-1 accuracy (%)",
    "val_top1": "Validation top-1 accuracy (%)",
    "1nn": "1-NN accuracy (%)",
    "map@10": "mAP@10 (%)",
}
# Said after a table's title.
METRIC_NOTES = {"val_top1": "of the jobs without test metrics, kept apart from their test numbers"}


@dataclass(frozen=True)
class Cell:
    """Mean and sample standard deviation (0 for one seed) over ``n`` seeds, in percent; ``values``: the
    seeds' own numbers (what a significance test of two cells needs)."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...] = field(default=(), compare=False)
    split: str = field(default="", compare=False)  # what its numbers were measured on (Record.split)


def _method_key(method: str) -> tuple[int, str]:
    base = method.split(" [", 1)[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def aggregate(records: list[Record]) -> dict[str, dict[str, dict[int, Cell]]]:
    """``{metric: {method: {size: Cell}}}``; FF's one-size jobs join into one FF row."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    splits: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for r in records:
        values[(r.metric, r.method, r.size)].append(100.0 * r.value)
        if r.split:
            splits[(r.metric, r.method, r.size)].add(r.split)
    out: dict[str, dict[str, dict[int, Cell]]] = {m: {} for m in METRICS}
    for (metric, method, size), vs in sorted(values.items()):
        mean = sum(vs) / len(vs)
        std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
        split = "; ".join(sorted(splits[(metric, method, size)]))
        out.setdefault(metric, {}).setdefault(method, {})[size] = Cell(mean, std, len(vs), tuple(vs), split)
    return {
        metric: dict(sorted(rows.items(), key=lambda kv: _method_key(kv[0]))) for metric, rows in out.items()
    }


def sizes_of(table: dict[str, dict[int, Cell]]) -> list[int]:
    return sorted({d for row in table.values() for d in row})


def split_note(table: dict[str, dict[int, Cell]]) -> str:
    """What a table's numbers were measured on: ``test split``, or each split with its rows when the
    rows differ (the trained heads' test top-1 beside the post-hoc probes' evaluation split)."""
    rows: dict[str, list[str]] = defaultdict(list)
    for method, row in table.items():
        for split in dict.fromkeys(c.split for c in row.values() if c.split):
            rows[split].append(method)
    if len(rows) <= 1:
        return next(iter(rows), "")
    return "; ".join(f"{', '.join(methods)}: {split}" for split, methods in rows.items())


def markdown(tables: dict[str, dict[str, dict[int, Cell]]]) -> str:
    """One Markdown table per metric: methods as rows, sizes as columns, ``mean ± std (n seeds)``."""
    parts = []
    for metric, table in tables.items():
        if not table:
            continue
        sizes = sizes_of(table)
        seeds = sorted({c.n for row in table.values() for c in row.values()})
        note = (
            f"mean over {seeds[0]} seed(s)"
            if len(seeds) == 1
            else f"mean over {seeds[0]}-{seeds[-1]} seeds (a cell without ± has one)"
        )
        about = f" {METRIC_NOTES[metric]}," if metric in METRIC_NOTES else ""
        where = split_note(table)
        where = f" on {where}," if where else ""
        parts.append(f"**{METRIC_TITLES.get(metric, metric)}**{where}{about} {note} (± sample std)\n")
        parts.append("| method | " + " | ".join(f"d={d}" for d in sizes) + " |")
        parts.append("|---|" + "---:|" * len(sizes))
        for method, row in table.items():
            cells = [
                (f"{row[d].mean:.2f} ± {row[d].std:.2f}" if row[d].n > 1 else f"{row[d].mean:.2f}")
                if d in row
                else "–"
                for d in sizes
            ]
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def to_json(tables: dict[str, dict[str, dict[int, Cell]]]) -> dict:
    return {
        metric: {
            method: {
                str(d): {"mean": c.mean, "std": c.std, "n": c.n, "values": list(c.values)}
                for d, c in row.items()
            }
            for method, row in table.items()
        }
        for metric, table in tables.items()
    }


def _top1_source(info: JobInfo) -> str:
    if not info.results:
        return "none (no results.json: unfinished or failed)"
    return {"test": "test", "val": "val only (no test metrics)"}.get(info.top1, "none (no per-size accuracy)")


def _job_list(infos: list[JobInfo]) -> str:
    return ", ".join(i.job for i in infos)


def jobs_markdown(infos: list[JobInfo]) -> str:
    """Every job, where its numbers came from, and the jobs that lack some of them (listed, not dropped)."""
    settings = sorted({i.evaluated for i in infos if i.evaluated})
    lines = [
        f"**Jobs** ({len(infos)}): top-1 from each job's results.json; 1-NN, mAP@10 and baselines "
        "from its newest evaluation (a checkpoint's report.json) with the splits and data most jobs were "
        "evaluated on" + (f" ({settings[0]})." if len(settings) == 1 else "."),
        "",
    ]
    notes = [
        ("no results.json (unfinished or failed), so no top-1", [i for i in infos if not i.results]),
        (
            "no test metrics, top-1 of the validation split in its own table",
            [i for i in infos if i.results and i.top1 == "val"],
        ),
        ("no per-size accuracy in results.json", [i for i in infos if i.results and i.top1 == "none"]),
        ("no evaluation found, so no 1-NN, mAP@10 or baselines", [i for i in infos if not i.evaluations]),
        (
            "evaluated only on other splits or data, so no 1-NN, mAP@10 or baselines compared",
            [i for i in infos if i.evaluations and not i.eval_report],
        ),
        (
            "evaluations on other splits or data left out",
            [i for i in infos if i.eval_report and i.other_settings],
        ),
        (
            "evaluated more than once, the newest comparable evaluation used (sizes it lacks from older "
            "ones of its checkpoint)",
            [i for i in infos if i.evaluations > 1],
        ),
    ]
    lines += [f"- {what}: {_job_list(jobs)}" for what, jobs in notes if jobs]
    lines += ["", "| job | method | seed | top-1 | evaluations | eval numbers from | checkpoint evaluated |"]
    lines.append("|---|---|---:|---|---:|---|---|")
    for i in infos:
        checkpoint = i.checkpoint or ("not recorded" if i.eval_report else "–")
        lines.append(
            f"| {i.job} | {i.method} | {i.seed} | {_top1_source(i)} | {i.evaluations} | "
            f"{i.eval_report or '–'} | {checkpoint} |"
        )
    return "\n".join(lines) + "\n"
