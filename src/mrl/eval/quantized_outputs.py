"""report.json's ``quantized`` section (``mrl.eval.quantized``) shown to the user: the PNG of quality
against bytes per vector, the W&B table, chart and summary numbers, and the terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrl.tracking.charts import save_figure

MARKERS = {"float32": "o", "float16": "D", "int8": "s", "binary": "^"}
LABEL_OFFSETS = ((3, -11), (-9, 5), (4, 4))  # points, per format in the section's order


def quantized_k(section: dict[str, dict[str, dict]]) -> int:
    """The k of the section's ``map@k`` (``quantized.k``)."""
    rows = [row for per_size in section.values() for row in per_size.values()]
    return next(int(key.split("@")[1]) for key in rows[0] if key.startswith("map@"))


def quantized_rows(section: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[Any]]]:
    """One row per (format, size): format, size, bytes per vector, mAP@k, 1-NN."""
    k = quantized_k(section)
    columns = ["format", "size", "bytes", f"map@{k}", "1nn"]
    rows = [
        [fmt, int(d), row["bytes"], row[f"map@{k}"], row["1nn"]]
        for fmt, per_size in section.items()
        for d, row in per_size.items()
    ]
    return columns, rows


def quantized_plot(section: dict[str, dict[str, dict]], path: Path, what: str = "prefixes") -> Path:
    """mAP@k and 1-NN against bytes per vector (log-2 axis), one line per format, each point its size;
    ``what`` the vectors are (a CSR model's: sparse codes, each point its k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = quantized_k(section)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, label in ((axes[0], f"map@{k}", f"mAP@{k} (%)"), (axes[1], "1nn", "1-NN accuracy (%)")):
        for i, (fmt, per_size) in enumerate(section.items()):
            sizes = sorted(per_size, key=int)
            xs = [per_size[d]["bytes"] for d in sizes]
            ys = [100 * per_size[d][key] for d in sizes]
            (line,) = ax.plot(xs, ys, marker=MARKERS.get(fmt, "o"), label=fmt)
            # each format's size labels in its colour, on its own side, where the curves meet at the top
            offset = LABEL_OFFSETS[i % len(LABEL_OFFSETS)]
            for d, x, y in zip(sizes, xs, ys, strict=True):
                ax.annotate(
                    str(d),
                    (x, y),
                    textcoords="offset points",
                    xytext=offset,
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="stored as")
    point = "number of active units k" if what == "sparse codes" else "prefix size d"
    fig.suptitle(f"Quantised {what}: quality against memory (points: {point})")
    return save_figure(fig, path)


def quantized_wandb(section: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """``eval/quantized``: the rows as a W&B table, and its mAP@k against bytes chart, one line per format."""
    import wandb

    columns, rows = quantized_rows(section)
    table = wandb.Table(columns=columns, data=rows)
    title = f"Quantised prefixes: {columns[3]} vs bytes per vector"
    chart = wandb.plot.line(table, "bytes", columns[3], stroke="format", title=title)
    return {"eval/quantized": table, "eval/quantized_chart": chart}


def quantized_summary(section: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Summary keys ``eval/quantized/<format>/<bytes|map@k|1nn>@<d>``."""
    return {
        f"eval/quantized/{fmt}/{key}@{d}": value
        for fmt, per_size in section.items()
        for d, row in per_size.items()
        for key, value in row.items()
    }


def quantized_text(section: dict[str, dict[str, dict]], what: str = "prefixes") -> list[str]:
    """The terminal table: per size, each format's bytes per vector, mAP@k and 1-NN (in %); ``what``
    the vectors are (a CSR model's: sparse codes)."""
    k = quantized_k(section)
    formats = list(section)
    lines = [f"quantized {what} (bytes per vector | mAP@{k} | 1-NN, in %):"]
    lines.append(f"{'size':>6}" + "".join(f"{fmt:>24}" for fmt in formats))
    sizes = sorted({int(d) for per_size in section.values() for d in per_size})
    for d in sizes:
        cells = []
        for fmt in formats:
            row = section[fmt].get(str(d))
            cell = f"{row['bytes']:>6} B {100 * row[f'map@{k}']:6.2f} {100 * row['1nn']:6.2f}" if row else "-"
            cells.append(f"{cell:>24}")
        lines.append(f"{d:>6}" + "".join(cells))
    return lines
