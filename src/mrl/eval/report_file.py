"""``report.json``: its fixed shape (sections in the documented order, sizes as string keys), writing it,
and the per-size table every other output (terminal summary, W&B, plots) reads from it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mrl.eval.sparse_codes import prefix_bytes, sparse_code_bytes
from mrl.files import atomic_write_text

REPORT_KEYS = (
    "sizes",
    "evaluated",
    "linear",
    "knn",
    "retrieval",
    "sparse_retrieval",
    "adaptive_classification",
    "adaptive_retrieval",
    "exact_retrieval",
    "baselines",
    "robustness",
    "quantized",
    "bytes",
    "skipped",
    "checkpoint",
)


def _str_keys(per_size: dict) -> dict[str, Any]:
    return {str(d): v for d, v in sorted(per_size.items(), key=lambda kv: int(kv[0]))}


def bytes_section(
    sizes: list[int],
    quantized: Mapping[str, Any],
    baselines: Mapping[str, Any],
    code_units: int | None = None,
) -> dict:
    """Bytes of one stored vector per method, format and size: the model's size-d prefixes in every
    format the ``quantized`` section measured (float32 alone when it did not run), and the post-hoc
    SVD and truncation baselines as float32 at their sizes (``mrl.eval.sparse_codes.prefix_bytes``).

    A CSR model (``code_units``: its code's width, ``hidden``) stores codes, not prefixes: its method is
    ``csr``, a size-k code ``k`` values (at each value format measured) and ``k`` unit indices
    (``mrl.eval.sparse_codes.sparse_code_bytes``)."""
    formats = list(quantized) or ["float32"]
    if code_units is not None:
        codes = {
            fmt: {str(k): sparse_code_bytes(int(k), code_units, fmt) for k in sorted(sizes)}
            for fmt in formats
        }
        return {"csr": codes}
    out = {"embedding": {fmt: {str(d): prefix_bytes(int(d), fmt) for d in sorted(sizes)} for fmt in formats}}
    for name in ("svd", "slice"):
        if baselines.get(name):
            out[name] = {
                "float32": {str(d): prefix_bytes(int(d), "float32") for d in _str_keys(baselines[name])}
            }
    return out


def build_report(
    sizes: list[int],
    sections: Mapping[str, Any],
    checkpoint: dict,
    code_units: int | None = None,
    evaluated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report in the documented shape from the evaluators' ``sections`` (a method that did not run
    leaves its section empty); ``checkpoint`` says which checkpoint was evaluated and with which settings
    (``mrl.eval.locations.checkpoint_record``, as its checkpoint.json); ``code_units``: a CSR model's
    code width (its sizes are numbers of active units, :func:`bytes_section`); ``evaluated``: the splits
    the numbers come from (``mrl.eval.run``)."""
    baselines = sections.get("baselines", {})
    return {
        "sizes": [int(d) for d in sizes],
        # database_split, query_split, database_items, query_items, and exclude_self: whether the queries
        # were the database's own items, each left out of its own neighbours (and of the relevant items
        # recall counts), the post-hoc probes tested on items they did not train on
        "evaluated": dict(evaluated or {}),
        "linear": _str_keys(sections.get("linear", {})),
        "knn": _str_keys(sections.get("knn", {})),
        "retrieval": _str_keys(sections.get("retrieval", {})),
        # a CSR model's sparse search per k: k searched, index_seconds, search_seconds, seconds_per_query,
        # active_units (mrl.eval.sparse_eval.code_search)
        "sparse_retrieval": _str_keys(sections.get("sparse_retrieval", {})),
        "adaptive_classification": list(sections.get("adaptive_classification", [])),
        "adaptive_retrieval": list(sections.get("adaptive_retrieval", [])),
        "exact_retrieval": dict(sections.get("exact_retrieval", {})),
        "baselines": {
            "svd": _str_keys(baselines.get("svd", {})),
            "slice": _str_keys(baselines.get("slice", {})),
            # 1-NN accuracy of the same reductions (the comparison table's 1-NN column)
            "svd_1nn": _str_keys(baselines.get("svd_1nn", {})),
            "slice_1nn": _str_keys(baselines.get("slice_1nn", {})),
        },
        # per robustness set: root, images, classes covered, restricted, top1 per size (mrl.eval.robustness)
        "robustness": dict(sections.get("robustness", {})),
        # {format: {d: {bytes, map@k, 1nn}}}: float32 and the quantised formats (mrl.eval.quantized)
        "quantized": {fmt: _str_keys(rows) for fmt, rows in sections.get("quantized", {}).items()},
        # {method: {format: {d: bytes of one stored vector}}}: embedding (its prefixes), svd, slice; or
        # csr (a CSR model's codes)
        "bytes": bytes_section(sizes, sections.get("quantized", {}), baselines, code_units),
        # {evaluator or setting: why it was not measured} (what does not apply to a CSR model's codes)
        "skipped": dict(sections.get("skipped", {})),
        "checkpoint": dict(checkpoint),
    }


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    assert tuple(report) == REPORT_KEYS, "report.json must keep its documented shape"
    # not sort_keys: sizes stay in numeric order ("2", "4", ..., "16"), sections in the documented order
    return atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")


def retrieval_k(report: dict[str, Any]) -> int:
    """The k of the per-size retrieval numbers shown in plots and tables: the paper's 10 when it was
    measured, else the smallest k of ``retrieval.ks`` (a tiny database may not hold 10 items)."""
    keys = {key for values in report["retrieval"].values() for key in values}
    ks = sorted(int(key.split("@")[1]) for key in keys if key.startswith("map@"))
    return 10 if 10 in ks or not ks else ks[0]


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
