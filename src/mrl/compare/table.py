"""Aggregate a sweep's records over seeds into methods x sizes tables, and write them as Markdown/JSON."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from mrl.compare.collect import METRICS, Record

# The paper's order; anything else (variants) follows alphabetically.
METHOD_ORDER = ("mrl", "mrl_e", "ff", "standard", "svd", "slice")
METRIC_TITLES = {"top1": "Top-1 accuracy (%)", "1nn": "1-NN accuracy (%)", "map@10": "mAP@10 (%)"}


@dataclass(frozen=True)
class Cell:
    """Mean and sample standard deviation (0 for one seed) over ``n`` seeds, in percent."""

    mean: float
    std: float
    n: int


def _method_key(method: str) -> tuple[int, str]:
    base = method.split(" [", 1)[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def aggregate(records: list[Record]) -> dict[str, dict[str, dict[int, Cell]]]:
    """``{metric: {method: {size: Cell}}}``; FF's one-size jobs join into one FF row."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        values[(r.metric, r.method, r.size)].append(100.0 * r.value)
    out: dict[str, dict[str, dict[int, Cell]]] = {m: {} for m in METRICS}
    for (metric, method, size), vs in sorted(values.items()):
        mean = sum(vs) / len(vs)
        std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
        out.setdefault(metric, {}).setdefault(method, {})[size] = Cell(mean, std, len(vs))
    return {
        metric: dict(sorted(rows.items(), key=lambda kv: _method_key(kv[0]))) for metric, rows in out.items()
    }


def sizes_of(table: dict[str, dict[int, Cell]]) -> list[int]:
    return sorted({d for row in table.values() for d in row})


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
        parts.append(f"**{METRIC_TITLES.get(metric, metric)}**, {note} (± sample std)\n")
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
            method: {str(d): {"mean": c.mean, "std": c.std, "n": c.n} for d, c in row.items()}
            for method, row in table.items()
        }
        for metric, table in tables.items()
    }
