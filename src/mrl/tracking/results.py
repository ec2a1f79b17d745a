"""The job's result files: ``results.json`` (final metrics) and a summary table on the terminal."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.json"


def read_results(output_dir: Path) -> dict[str, float]:
    """A job's earlier ``results.json`` (empty when it has none or it cannot be read)."""
    try:
        data = json.loads((Path(output_dir) / RESULTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Lightning's callback metrics (tensors) as plain floats, only the ``stage/name`` keys."""
    out = {}
    for key, value in metrics.items():
        if "/" not in key:
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def size_table(
    results: Mapping[str, float], sizes: Sequence[int], stages: Sequence[str] = ("val", "test")
) -> str:
    """A fixed-width table of top-1 accuracy (%) per size for the given stages."""
    stages = [s for s in stages if any(f"{s}/acc@{d}" in results for d in sizes)]
    header = f"{'size':>6} " + " ".join(f"{s + ' top-1':>11}" for s in stages)
    lines = [header, "-" * len(header)]
    for d in sizes:
        cells = []
        for s in stages:
            value = results.get(f"{s}/acc@{d}")
            cells.append(f"{100 * value:>10.2f}%" if value is not None else f"{'-':>11}")
        lines.append(f"{d:>6} " + " ".join(cells))
    return "\n".join(lines)
