"""Accuracy-vs-size charts: a W&B table + line plot during training, and a PNG in the job dir."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

from mrl.files import atomic_path


def log_accuracy_vs_size(
    loggers: Iterable[Logger],
    stage: str,
    sizes: Sequence[int],
    accuracies: Sequence[float],
    step: int,
    epoch: int,
) -> None:
    """Send the per-size accuracy of ``stage`` to every W&B logger as a table and a line chart.

    The table goes to ``{stage}/acc_vs_size`` (one row per size) and the chart to
    ``{stage}/acc_vs_size_chart``; W&B keeps one version per epoch.
    """
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        table = wandb.Table(
            columns=["size", "accuracy", "epoch"],
            data=[[int(d), float(a), int(epoch)] for d, a in zip(sizes, accuracies, strict=True)],
        )
        chart = wandb.plot.line(table, "size", "accuracy", title=f"{stage} top-1 accuracy vs embedding size")
        logger.experiment.log(
            {f"{stage}/acc_vs_size": table, f"{stage}/acc_vs_size_chart": chart, "trainer/global_step": step}
        )


def plot_accuracy_vs_size(
    curves: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path,
    title: str,
    ylabel: str = "top-1 accuracy",
) -> Path:
    """Write a PNG of accuracy against embedding size (log2 x axis), one line per entry of ``curves``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (sizes, values) in curves.items():
        ax.plot(sizes, [100 * v for v in values], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding size d (prefix z[:, :d])")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close it: a crash never leaves a half-written plot."""
    import matplotlib.pyplot as plt

    # the constrained layout engine fits titles and labels without tight_layout's warning when it cannot
    fig.set_layout_engine("constrained")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
