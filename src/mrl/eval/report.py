"""The evaluation's outputs: ``report.json`` (fixed shape, sizes as string keys), PNG plots, W&B tables
and charts, and a summary on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrl.files import atomic_write_text
from mrl.tracking.charts import plot_accuracy_vs_size, save_figure

REPORT_KEYS = (
    "sizes",
    "linear",
    "knn",
    "retrieval",
    "adaptive_classification",
    "adaptive_retrieval",
    "exact_retrieval",
    "baselines",
    "checkpoint",
)


def _str_keys(per_size: dict) -> dict[str, Any]:
    return {str(d): v for d, v in sorted(per_size.items(), key=lambda kv: int(kv[0]))}


def build_report(
    sizes: list[int],
    linear: dict,
    knn: dict,
    retrieval: dict,
    adaptive_classification: list,
    adaptive_retrieval: list,
    exact_retrieval: dict,
    baselines: dict,
    checkpoint: dict | None = None,
) -> dict[str, Any]:
    """The report in the documented shape (a disabled method leaves its section empty); ``checkpoint``
    says which checkpoint was evaluated (``mrl.eval.locations.checkpoint_record``)."""
    return {
        "sizes": [int(d) for d in sizes],
        "linear": _str_keys(linear),
        "knn": _str_keys(knn),
        "retrieval": _str_keys(retrieval),
        "adaptive_classification": list(adaptive_classification),
        "adaptive_retrieval": list(adaptive_retrieval),
        "exact_retrieval": dict(exact_retrieval),
        "baselines": {
            "svd": _str_keys(baselines.get("svd", {})),
            "slice": _str_keys(baselines.get("slice", {})),
            # 1-NN accuracy of the same reductions (the comparison table's 1-NN column)
            "svd_1nn": _str_keys(baselines.get("svd_1nn", {})),
            "slice_1nn": _str_keys(baselines.get("slice_1nn", {})),
        },
        "checkpoint": dict(checkpoint or {}),
    }


def retrieval_k(report: dict[str, Any]) -> int:
    """The k of the per-size retrieval numbers shown in plots and tables: the paper's 10 when it was
    measured, else the smallest k of ``retrieval.ks`` (a tiny database may not hold 10 items)."""
    keys = {key for values in report["retrieval"].values() for key in values}
    ks = sorted(int(key.split("@")[1]) for key in keys if key.startswith("map@"))
    return 10 if 10 in ks or not ks else ks[0]


def _curve(section: dict, key: str | None = None) -> tuple[list[int], list[float]]:
    sizes = [int(d) for d in section]
    return sizes, [section[str(d)] if key is None else section[str(d)][key] for d in sizes]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``acc_vs_size.png`` (every method), ``adaptive_classification.png``, ``adaptive_retrieval.png``."""
    paths = []
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
    if curves:
        paths.append(
            plot_accuracy_vs_size(curves, out_dir / "acc_vs_size.png", "Accuracy vs embedding size", "score")
        )
    plt = _plt()
    if report["adaptive_classification"]:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
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
        paths.append(save_figure(fig, out_dir / "adaptive_classification.png"))
    if report["adaptive_retrieval"]:
        # left: the paper's cost model (MFLOPs/query); right: measured wall-clock per query
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
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
                ax.scatter(
                    exact[key], 100 * exact["map@10"], marker="x", s=80, c="k", label="exact full size"
                )
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("mAP@10 (%)")
        axes[1].legend(fontsize=7)
        fig.suptitle("Adaptive retrieval: quality against cost")
        paths.append(save_figure(fig, out_dir / "adaptive_retrieval.png"))
    return paths


def per_size_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per size with every per-size number (W&B table and terminal summary)."""
    k = retrieval_k(report)
    columns = [
        "size",
        "linear_top1",
        "linear_top5",
        "1nn",
        "knn",
        f"map@{k}",
        f"recall@{k}",
        "svd",
        "slice",
        "svd_1nn",
        "slice_1nn",
    ]
    sizes = sorted(
        {int(d) for section in ("linear", "knn", "retrieval") for d in report[section]}
        | {int(d) for b in report["baselines"].values() for d in b}
    )
    rows = []
    for d in sizes:
        key = str(d)
        lin, knn, ret = (
            report["linear"].get(key, {}),
            report["knn"].get(key, {}),
            report["retrieval"].get(key, {}),
        )
        rows.append(
            [
                d,
                lin.get("top1"),
                lin.get("top5"),
                knn.get("1nn"),
                knn.get("knn"),
                ret.get(f"map@{k}"),
                ret.get(f"recall@{k}"),
                report["baselines"]["svd"].get(key),
                report["baselines"]["slice"].get(key),
                report["baselines"]["svd_1nn"].get(key),
                report["baselines"]["slice_1nn"].get(key),
            ]
        )
    return columns, rows


def summary_text(report: dict[str, Any]) -> str:
    columns, rows = per_size_rows(report)
    # columns of methods that did not run (all "-") are left out of the terminal table
    shown = [0, *(i for i in range(1, len(columns)) if any(r[i] is not None for r in rows))]
    columns, rows = [columns[i] for i in shown], [[r[i] for i in shown] for r in rows]
    fmt = lambda v: f"{100 * v:>12.2f}" if isinstance(v, float) else f"{'-':>12}"  # noqa: E731
    lines = [f"{'size':>6}" + "".join(f"{c:>12}" for c in columns[1:])]
    lines.append("-" * len(lines[0]))
    lines += [f"{r[0]:>6}" + "".join(fmt(v) for v in r[1:]) for r in rows]
    exact = report["exact_retrieval"]
    if exact:
        lines.append("")
        lines.append(
            f"exact full-size search: mAP@10 {100 * exact['map@10']:.2f}, top-1 {100 * exact['top1']:.2f}, "
            f"{exact['mflops_per_query']:.2f} MFLOPs, {1e3 * exact['seconds_per_query']:.3f} ms/query"
        )
    for r in report["adaptive_retrieval"]:
        speedup = (
            exact["seconds_per_query"] / r["seconds_per_query"] if exact and r["seconds_per_query"] else 0
        )
        lines.append(
            f"[{r.get('index', 'flat')}] D_s={r['shortlist_size']:<4} rerank {r['rerank_sizes']} "
            f"k {r['shortlists']}: mAP@10 "
            f"{100 * r['map@10']:.2f}, top-1 {100 * r['top1']:.2f}, {r['mflops_per_query']:.3f} MFLOPs, "
            f"{1e3 * r['seconds_per_query']:.3f} ms/query ({speedup:.1f}x faster than exact)"
        )
    if report["adaptive_classification"]:
        lines.append("")
        lines.append("adaptive classification (accuracy | expected size | total size):")
        for r in report["adaptive_classification"]:
            lines.append(
                f"  {100 * r['accuracy']:6.2f}% | {r['expected_size']:8.1f} | {r['total_size']:8.1f}"
            )
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    assert tuple(report) == REPORT_KEYS, "report.json must keep its documented shape"
    # not sort_keys: sizes stay in numeric order ("2", "4", ..., "16"), sections in the documented order
    return atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")


def log_wandb(run, report: dict[str, Any], pngs: list[Path]) -> None:
    """Tables, charts, images and summary numbers of ``report`` in the W&B ``run``."""
    import wandb

    columns, rows = per_size_rows(report)
    per_size = wandb.Table(columns=columns, data=rows)
    data: dict[str, Any] = {"eval/per_size": per_size}
    if report["linear"]:
        data["eval/linear_top1_chart"] = wandb.plot.line(
            per_size, "size", "linear_top1", title="Linear top-1 vs size"
        )
    if report["retrieval"]:
        k = retrieval_k(report)
        data[f"eval/map@{k}_chart"] = wandb.plot.line(per_size, "size", f"map@{k}", title=f"mAP@{k} vs size")
    if report["adaptive_classification"]:
        cols = ["expected_size", "total_size", "accuracy", "target_accuracy"]
        table = wandb.Table(
            columns=cols, data=[[r[c] for c in cols] for r in report["adaptive_classification"]]
        )
        data["eval/adaptive_classification"] = table
        data["eval/adaptive_classification_chart"] = wandb.plot.line(
            table, "expected_size", "accuracy", title="Adaptive classification: accuracy vs expected size"
        )
    if report["adaptive_retrieval"]:
        cols = [
            "shortlist_size",
            "rerank_sizes",
            "shortlists",
            "map@10",
            "top1",
            "mflops_per_query",
            "seconds_per_query",
        ]
        table = wandb.Table(
            columns=cols,
            data=[
                [str(r[c]) if isinstance(r[c], list) else r[c] for c in cols]
                for r in report["adaptive_retrieval"]
            ],
        )
        data["eval/adaptive_retrieval"] = table
        data["eval/adaptive_retrieval_chart"] = wandb.plot.scatter(
            table, "mflops_per_query", "map@10", title="Adaptive retrieval: mAP@10 vs MFLOPs/query"
        )
    for png in pngs:
        data[f"eval/{png.stem}_png"] = wandb.Image(str(png))
    run.log(data)
    summary = {}
    for section in ("linear", "knn", "retrieval"):  # every per-size number (retrieval: every k)
        for d, values in report[section].items():
            for key, value in values.items():
                summary[f"eval/{section}/{key}@{d}"] = value
    for name, per_size in report["baselines"].items():
        for d, value in per_size.items():
            summary[f"eval/baselines/{name}@{d}"] = value
    for key, value in report["exact_retrieval"].items():
        summary[f"eval/exact_retrieval/{key}"] = value
    run.summary.update(summary)
