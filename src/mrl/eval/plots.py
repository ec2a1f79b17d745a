"""The evaluation's PNG plots, drawn from ``report.json``: accuracy vs size of every method, adaptive
classification against fixed sizes, and adaptive retrieval's quality against its cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrl.eval.quantized_outputs import quantized_plot
from mrl.eval.report_file import retrieval_k
from mrl.tracking.charts import plot_accuracy_vs_size, save_figure


def _curve(section: dict, key: str | None = None) -> tuple[list[int], list[float]]:
    sizes = [int(d) for d in section]
    return sizes, [section[str(d)] if key is None else section[str(d)][key] for d in sizes]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``acc_vs_size.png`` (every method), ``adaptive_classification.png``, ``adaptive_retrieval.png``,
    ``robustness.png``, ``quantized.png``; a plot whose methods did not run is not written."""
    paths = []
    curves = _size_curves(report)
    if curves:
        paths.append(
            plot_accuracy_vs_size(curves, out_dir / "acc_vs_size.png", "Accuracy vs embedding size", "score")
        )
    if report["adaptive_classification"]:
        paths.append(_adaptive_classification_plot(report, out_dir / "adaptive_classification.png"))
    if report["adaptive_retrieval"]:
        paths.append(_adaptive_retrieval_plot(report, out_dir / "adaptive_retrieval.png"))
    if report.get("robustness"):
        paths.append(_robustness_plot(report, out_dir / "robustness.png"))
    if report["quantized"]:
        what = "sparse codes" if "csr" in report["bytes"] else "prefixes"
        paths.append(quantized_plot(report["quantized"], out_dir / "quantized.png", what))
    return paths


def _size_curves(report: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    curves = {}
    if report["linear"]:
        curves["linear top-1"] = _curve(report["linear"], "top1")
    if report["knn"]:
        curves["1-NN"] = _curve(report["knn"], "1nn")
        curves["k-NN"] = _curve(report["knn"], "knn")
    if report["retrieval"]:
        k = retrieval_k(report)
        curves[f"mAP@{k}"] = _curve(report["retrieval"], f"map@{k}")
    for name, label in (("svd", "SVD + probe"), ("slice", "slice + probe")):
        if report["baselines"][name]:
            curves[label] = _curve(report["baselines"][name])
    return curves


def _adaptive_classification_plot(report: dict[str, Any], path: Path) -> Path:
    fig, ax = _plt().subplots(figsize=(6, 4), dpi=120)
    rows = report["adaptive_classification"]
    acc = [100 * r["accuracy"] for r in rows]
    ax.plot([r["expected_size"] for r in rows], acc, marker="o", label="adaptive: expected size")
    ax.plot([r["total_size"] for r in rows], acc, marker="s", label="adaptive: total size computed")
    if report["linear"]:
        sizes, top1 = _curve(report["linear"], "top1")
        ax.plot(sizes, [100 * v for v in top1], marker="^", linestyle="--", label="fixed size")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding size")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Adaptive classification")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _adaptive_retrieval_plot(report: dict[str, Any], path: Path) -> Path:
    # left: the paper's cost model (MFLOPs/query); right: measured wall-clock per query
    fig, axes = _plt().subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    exact = report["exact_retrieval"]
    for ax, key, xlabel in (
        (axes[0], "mflops_per_query", "MFLOPs per query"),
        (axes[1], "seconds_per_query", "seconds per query (measured)"),
    ):
        for r in report["adaptive_retrieval"]:
            funnel = len(r["rerank_sizes"]) > 1
            label = f"{r.get('index', 'flat')} {'funnel ' if funnel else ''}D_s={r['shortlist_size']}"
            marker = ("*" if funnel else "o") if r.get("index") != "hnsw" else ("P" if funnel else "s")
            ax.scatter(r[key], 100 * r["map@10"], marker=marker, s=60, label=label)
        if exact:
            ax.scatter(exact[key], 100 * exact["map@10"], marker="x", s=80, c="k", label="exact full size")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mAP@10 (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Adaptive retrieval: quality against cost")
    return save_figure(fig, path)


def _robustness_plot(report: dict[str, Any], path: Path) -> Path:
    """Linear top-1 vs size: the standard query split, and one line per robustness set."""
    curves = {}
    if report["linear"]:
        curves["query split"] = _curve(report["linear"], "top1")
    for name, entry in report["robustness"].items():
        restricted = f", {entry['classes']} classes" if entry["restricted"] else ""
        curves[f"{name} ({entry['images']} images{restricted})"] = _curve(entry["top1"])
    return plot_accuracy_vs_size(curves, path, "Robustness sets: linear top-1 vs size", "top-1")
