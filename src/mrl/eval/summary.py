"""The evaluation's summary on the terminal: the per-size table (methods that did not run left out),
exact search, every funnel against it, and the adaptive classification curve."""

from __future__ import annotations

from typing import Any

from mrl.eval.quantized_outputs import quantized_text
from mrl.eval.report_file import per_size_rows
from mrl.eval.sparse_eval import sparse_retrieval_text


def summary_text(report: dict[str, Any]) -> str:
    """What `mrl-eval` prints at the end, from ``report``."""
    columns, rows = per_size_rows(report)
    # columns of methods that did not run (all "-") are left out of the terminal table
    shown = [0, *(i for i in range(1, len(columns)) if any(r[i] is not None for r in rows))]
    columns, rows = [columns[i] for i in shown], [[r[i] for i in shown] for r in rows]
    fmt = lambda v: f"{100 * v:>12.2f}" if isinstance(v, float) else f"{'-':>12}"  # noqa: E731
    lines = [f"{'size':>6}" + "".join(f"{c:>12}" for c in columns[1:])]
    lines.append("-" * len(lines[0]))
    lines += [f"{r[0]:>6}" + "".join(fmt(v) for v in r[1:]) for r in rows]
    lines += sparse_retrieval_text(report["sparse_retrieval"])
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
    lines += _robustness_lines(report)
    if report["adaptive_classification"]:
        lines.append("")
        lines.append("adaptive classification (accuracy | expected size | total size):")
        for r in report["adaptive_classification"]:
            lines.append(
                f"  {100 * r['accuracy']:6.2f}% | {r['expected_size']:8.1f} | {r['total_size']:8.1f}"
            )
    if report["quantized"]:
        what = "sparse codes" if "csr" in report["bytes"] else "prefixes"
        lines += ["", *quantized_text(report["quantized"], what)]
    if report["skipped"]:
        lines += ["", "not measured:", *(f"  {name}: {reason}" for name, reason in report["skipped"].items())]
    return "\n".join(lines)


def _robustness_lines(report: dict[str, Any]) -> list[str]:
    """Linear top-1 (%) per size of each robustness set, with its images and classes."""
    sets = report.get("robustness") or {}
    if not sets:
        return []
    sizes = list(next(iter(sets.values()))["top1"])
    lines = ["", "robustness sets, linear top-1 (%):", f"{'set':>16}" + "".join(f"{d:>8}" for d in sizes)]
    for name, e in sets.items():
        masked = ", logits of these classes only" if e["restricted"] else ""
        values = "".join(f"{100 * e['top1'][d]:>8.2f}" for d in sizes)
        lines.append(f"{name:>16}{values}  ({e['images']} images, {e['classes']} classes{masked})")
    return lines
