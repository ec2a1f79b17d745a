"""The evaluation in a W&B run: the per-size table and charts, the adaptive tables, the PNGs, and every
number of ``report.json`` in the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrl.eval.quantized_outputs import quantized_summary, quantized_wandb
from mrl.eval.report_file import per_size_rows, retrieval_k

FUNNEL_COLUMNS = (
    "shortlist_size",
    "rerank_sizes",
    "shortlists",
    "map@10",
    "top1",
    "mflops_per_query",
    "seconds_per_query",
)


def log_report(run, report: dict[str, Any], pngs: list[Path]) -> None:
    """Tables, charts, images and summary numbers of ``report`` in the W&B ``run``."""
    import wandb

    data = _per_size_tables(report)
    if report["adaptive_classification"]:
        data |= _adaptive_classification_table(report["adaptive_classification"])
    if report["adaptive_retrieval"]:
        data |= _adaptive_retrieval_table(report["adaptive_retrieval"])
    if report.get("robustness"):
        data |= _robustness_table(report)
    if report["quantized"]:
        data |= quantized_wandb(report["quantized"])
    for png in pngs:
        data[f"eval/{png.stem}_png"] = wandb.Image(str(png))
    run.log(data)
    run.summary.update(_summary_numbers(report))


def _per_size_tables(report: dict[str, Any]) -> dict[str, Any]:
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
    return data


def _adaptive_classification_table(rows: list[dict]) -> dict[str, Any]:
    import wandb

    cols = ["expected_size", "total_size", "accuracy", "target_accuracy"]
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
    return {
        "eval/adaptive_classification": table,
        "eval/adaptive_classification_chart": wandb.plot.line(
            table, "expected_size", "accuracy", title="Adaptive classification: accuracy vs expected size"
        ),
    }


def _adaptive_retrieval_table(rows: list[dict]) -> dict[str, Any]:
    import wandb

    cols = list(FUNNEL_COLUMNS)
    table = wandb.Table(
        columns=cols, data=[[str(r[c]) if isinstance(r[c], list) else r[c] for c in cols] for r in rows]
    )
    return {
        "eval/adaptive_retrieval": table,
        "eval/adaptive_retrieval_chart": wandb.plot.scatter(
            table, "mflops_per_query", "map@10", title="Adaptive retrieval: mAP@10 vs MFLOPs/query"
        ),
    }


def _robustness_table(report: dict[str, Any]) -> dict[str, Any]:
    """One row per (set, size), the standard query split's linear top-1 as the set ``query split``,
    and a chart of top-1 vs size with one line per set."""
    import wandb

    cols = ["set", "size", "top1", "images", "classes", "restricted"]
    rows = [
        [name, int(d), v, e["images"], e["classes"], e["restricted"]]
        for name, e in report["robustness"].items()
        for d, v in e["top1"].items()
    ]
    rows += [["query split", int(d), v["top1"], None, None, False] for d, v in report["linear"].items()]
    table = wandb.Table(columns=cols, data=rows)
    return {
        "eval/robustness": table,
        "eval/robustness_chart": wandb.plot.line(
            table, "size", "top1", stroke="set", title="Robustness sets: linear top-1 vs size"
        ),
    }


def _summary_numbers(report: dict[str, Any]) -> dict[str, float]:
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
    for d, row in report["sparse_retrieval"].items():  # a CSR model's sparse searches
        for key, value in row.items():
            summary[f"eval/sparse_retrieval/{key}@{d}"] = value
    for name, entry in report.get("robustness", {}).items():
        for d, value in entry["top1"].items():
            summary[f"eval/robustness/{name}/top1@{d}"] = value
    summary |= quantized_summary(report["quantized"])
    return summary
