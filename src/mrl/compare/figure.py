"""The comparison figure in the paper's style: one panel per metric, accuracy against log2 size, one
line per method (FF as separately trained points joined by a dotted line, as in the paper's Fig. 2)."""

from __future__ import annotations

from pathlib import Path

from mrl.compare.table import METRIC_TITLES, Cell

STYLES = {
    "mrl": {"marker": "o", "linestyle": "-"},
    "mrl_e": {"marker": "s", "linestyle": "--"},
    "mrl+supcon": {"marker": "D", "linestyle": "-"},
    "mrl+infonce": {"marker": "P", "linestyle": "-"},
    "ff": {"marker": "^", "linestyle": ":"},
    "standard": {"marker": "*", "linestyle": "none", "markersize": 10},
    "svd": {"marker": "v", "linestyle": "-."},
    "slice": {"marker": "x", "linestyle": "-."},
}
LABELS = {
    "mrl": "MRL",
    "mrl_e": "MRL-E",
    "mrl+supcon": "MRL, SupCon",
    "mrl+infonce": "MRL, InfoNCE",
    "ff": "FF",
    "standard": "standard",
    "svd": "SVD",
    "slice": "slice",
}


def write_figure(tables: dict[str, dict[str, dict[int, Cell]]], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG, atomically) with a panel per metric that has data; error bars are seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m, t in tables.items() if t]
    # one colour per method in every panel (a panel lacking a method would shift the colour cycle)
    methods = list(dict.fromkeys(method for m in metrics for method in tables[m]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method, row in tables[metric].items():
            base, _, variant = method.partition(" [")
            sizes = sorted(row)
            style = STYLES.get(base, {"marker": "."})
            label = LABELS.get(base, base) + (f" [{variant}" if variant else "")
            ax.errorbar(
                sizes,
                [row[d].mean for d in sizes],
                yerr=[row[d].std for d in sizes],
                label=label,
                color=f"C{methods.index(method) % 10}",
                capsize=2,
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("representation size d")
        ax.set_ylabel(METRIC_TITLES.get(metric, metric))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    from mrl.tracking.charts import save_figure

    return save_figure(fig, path)
