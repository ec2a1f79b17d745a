"""Quality against bytes: report.json's bytes of one stored vector per method, size and format, and
mrl-report's figure, table and best method at each budget from hand-made evaluations."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from mrl.compare.job import report
from mrl.compare.quality_bytes import best_at_budgets, bytes_tables, report_records
from mrl.eval.report_file import build_report
from mrl.eval.sparse_codes import prefix_bytes, sparse_code_bytes
from support import top1_results as _top1
from support import write_evaluation as _evaluate
from support import write_job_dir as _job

# map@10 of each method's format at d = 0 (the hand-made reports add d / 100 and seed / 50)
BASE = {
    "mrl": {"float32": 0.5, "int8": 0.48, "binary": 0.3},
    "standard": {"float32": 0.45, "int8": 0.44, "binary": 0.1},
}
SIZES = (8, 16)
SEEDS = (0, 1)


def test_report_json_gives_the_bytes_of_one_vector_per_method_size_and_format():
    quantized = {fmt: {d: {"bytes": 0} for d in (1, 5, 8, 16)} for fmt in ("float32", "int8", "binary")}
    baselines = {"svd": {2: 0.5, 16: 0.6}, "slice": {}}
    section = build_report([16, 1, 5, 8], {"quantized": quantized, "baselines": baselines}, {})["bytes"]
    assert section == {
        "embedding": {
            "float32": {"1": 4, "5": 20, "8": 32, "16": 64},
            "int8": {"1": 1, "5": 5, "8": 8, "16": 16},
            "binary": {"1": 1, "5": 1, "8": 1, "16": 2},  # ceil(d / 8): padded to whole bytes
        },
        "svd": {"float32": {"2": 8, "16": 64}},  # no slice: it did not run
    }
    # without the quantized stage, the prefixes are stored as float32
    assert build_report([4], {}, {})["bytes"] == {"embedding": {"float32": {"4": 16}}}
    assert [prefix_bytes(d, "binary") for d in (7, 8, 9)] == [1, 1, 2]


def test_points_are_placed_at_their_bytes_per_vector():
    rep = {
        "quantized": {
            "float32": {"8": {"map@10": 0.7, "1nn": 0.8}},
            "binary": {"9": {"map@10": 0.3, "1nn": 0.4}},
        },
        "baselines": {"svd_1nn": {"4": 0.6}},
    }
    points = {
        (r.method, r.size, r.metric): r.value for r in report_records(rep, "standard", "standard", "", 0, "j")
    }
    assert points == {
        ("standard (float32)", 32, "map@10"): 0.7,
        ("standard (float32)", 32, "1nn"): 0.8,
        ("standard (binary)", 2, "map@10"): 0.3,
        ("standard (binary)", 2, "1nn"): 0.4,
        ("svd (float32)", 16, "1nn"): 0.6,
    }
    # an evaluation without the quantized stage: float32 from its kNN and retrieval sections
    plain = {"knn": {"4": {"1nn": 0.5}}, "retrieval": {"4": {"map@10": 0.4}}}
    assert {(r.method, r.size, r.metric) for r in report_records(plain, "mrl", "mrl", "", 0, "j")} == {
        ("mrl (float32)", 16, "1nn"),
        ("mrl (float32)", 16, "map@10"),
    }


def test_a_csr_models_codes_are_their_own_line_at_the_bytes_of_k_values_and_indices():
    # report.json's bytes of a CSR model's codes: k values and k indices (2 bytes each for 1024 units)
    quantized = {fmt: {k: {"bytes": 0} for k in (8, 32)} for fmt in ("float32", "float16")}
    section = build_report([32, 8], {"quantized": quantized}, {}, code_units=1024)["bytes"]
    assert section == {"csr": {"float32": {"8": 48, "32": 192}, "float16": {"8": 32, "32": 128}}}
    assert build_report([8], {}, {}, code_units=200)["bytes"] == {"csr": {"float32": {"8": 40}}}
    rep = {
        "quantized": {
            "float32": {"8": {"map@10": 0.7, "1nn": 0.8}},
            "float16": {"8": {"map@10": 0.6, "1nn": 0.7}},
        },
        "bytes": section,
    }
    points = {(r.method, r.size, r.metric): r.value for r in report_records(rep, "csr", "csr", "", 0, "j")}
    assert points == {
        ("csr (float32)", 48, "map@10"): 0.7,
        ("csr (float32)", 48, "1nn"): 0.8,
        ("csr (float16)", 32, "map@10"): 0.6,
        ("csr (float16)", 32, "1nn"): 0.7,
    }
    # without the quantized stage: float32 from the kNN and retrieval sections
    plain = {
        "knn": {"8": {"1nn": 0.5}},
        "retrieval": {"8": {"map@10": 0.4}},
        "bytes": {"csr": {"float32": {"8": 40}}},
    }
    assert {(r.method, r.size) for r in report_records(plain, "csr", "csr", "", 0, "j")} == {
        ("csr (float32)", 40)
    }
    # an evaluation that did not count its codes' bytes (one from before) places no point at a prefix's
    assert report_records({"knn": {"8": {"1nn": 0.5}}}, "csr", "csr", "", 0, "j") == []


def test_mrl_report_draws_a_csr_line_beside_the_prefixes(tmp_path):
    sweep = tmp_path / "sweep"
    mrl_job = _job(sweep / "0", {"kind": "mrl"}, 0, _top1({16: 0.5}))
    quantized = {"float32": {str(d): {"map@10": 0.5, "1nn": 0.6} for d in SIZES}}
    _evaluate(mrl_job, {"knn": {}, "retrieval": {}, "quantized": quantized}, "evaluate")
    csr_job = _job(sweep / "1", {"kind": "csr"}, 0, _top1({16: 0.5}))
    sections = {
        "quantized": {
            fmt: {k: {"bytes": sparse_code_bytes(k, 1024, fmt), "map@10": 0.7, "1nn": 0.75} for k in SIZES}
            for fmt in ("float32", "float16")
        }
    }
    _evaluate(csr_job, build_report(list(SIZES), sections, {}, code_units=1024), "mrl-eval")
    args = argparse.Namespace(
        sweep_dir=str(sweep), wandb_group=None, wandb_report=False, out=None, title="", no_wandb=True
    )
    out = report(args)
    tables = json.loads((out / "comparison.json").read_text())["quality_vs_bytes"]["tables"]
    assert set(tables["map@10"]) == {"mrl (float32)", "csr (float32)", "csr (float16)"}
    assert set(tables["map@10"]["csr (float32)"]) == {"48", "96"}  # k = 8, 16: 6 bytes per active unit
    assert tables["map@10"]["csr (float16)"]["32"]["mean"] == pytest.approx(70)
    md = (out / "comparison.md").read_text()
    assert "| csr (float16) | 32 | 70.00 | 75.00 |" in md
    # at 32 bytes the float16 codes (k=8) beat mrl's float32 8-d prefix
    assert "| 32 | mAP@10 (%) | csr (float16) | 32 | 70.00 |" in md


def map10(method: str, fmt: str, d: int, seed: int) -> float:
    return BASE[method][fmt] + d / 100 + seed / 50


def _sweep(tmp_path):
    """Two methods x two seeds, each evaluated with the quantized stage; the standard model's SVD 1-NN."""
    sweep = tmp_path / "sweep"
    for i, (method, seed) in enumerate((m, s) for m in BASE for s in SEEDS):
        job = _job(sweep / str(i), {"kind": method}, seed, _top1({16: 0.5}))
        quantized = {
            fmt: {
                str(d): {"map@10": map10(method, fmt, d, seed), "1nn": map10(method, fmt, d, seed) + 0.1}
                for d in SIZES
            }
            for fmt in BASE[method]
        }
        baselines = {"svd_1nn": {str(d): 0.9 + seed / 100 for d in SIZES}} if method == "standard" else {}
        _evaluate(
            job, {"knn": {}, "retrieval": {}, "quantized": quantized, "baselines": baselines}, "evaluate"
        )
    return sweep


def test_mrl_report_draws_quality_against_bytes_with_the_best_method_at_each_budget(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    args = argparse.Namespace(
        sweep_dir=str(sweep), wandb_group=None, wandb_report=False, out=None, title="", no_wandb=True
    )
    out = report(args)
    data = json.loads((out / "comparison.json").read_text())["quality_vs_bytes"]
    for method in BASE:
        for fmt in BASE[method]:
            for d in SIZES:
                cell = data["tables"]["map@10"][f"{method} ({fmt})"][str(prefix_bytes(d, fmt))]
                values = [100 * map10(method, fmt, d, s) for s in SEEDS]
                mean = sum(values) / 2
                assert cell["mean"] == pytest.approx(mean) and cell["n"] == 2
                assert cell["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values)))
    assert data["tables"]["1nn"]["svd (float32)"]["32"]["mean"] == pytest.approx(90.5)
    assert "svd (float32)" not in data["tables"]["map@10"]  # the baselines have no mAP@10
    best = {(b["metric"], b["budget"]): (b["method"], b["bytes"], b["mean"]) for b in data["best"]}
    assert best[("map@10", 1)] == ("mrl (binary)", 1, pytest.approx(39))
    assert best[("map@10", 16)] == ("mrl (int8)", 16, pytest.approx(65))
    # 32 bytes hold mrl's float32 d=8 (59) and its int8 d=16 (65): the better one wins, at fewer bytes
    assert best[("map@10", 32)] == ("mrl (int8)", 16, pytest.approx(65))
    assert best[("map@10", 64)] == ("mrl (float32)", 64, pytest.approx(67))
    assert best[("1nn", 8)] == ("mrl (int8)", 8, pytest.approx(67))
    assert best[("1nn", 32)] == ("svd (float32)", 32, pytest.approx(90.5))
    assert sorted(budget for metric, budget in best if metric == "map@10") == [1, 2, 8, 16, 32, 64]
    md = (out / "comparison.md").read_text()
    assert "| mrl (int8) | 16 | 65.00 ± 1.41 | 75.00 ± 1.41 |" in md
    assert "| 32 | mAP@10 (%) | mrl (int8) | 16 | 65.00 ± 1.41 |" in md
    assert "| 32 | 1-NN accuracy (%) | svd (float32) | 32 | 90.50 ± 0.71 |" in md
    assert (out / "quality_vs_bytes.png").stat().st_size > 10_000
    assert "Best at each budget" in capsys.readouterr().out


def test_the_figure_has_one_line_per_method_and_format_on_a_log2_bytes_axis(tmp_path, monkeypatch):
    from mrl.compare.quality_bytes import write_bytes_figure
    from mrl.tracking import charts

    figures = []
    monkeypatch.setattr(charts, "save_figure", lambda fig, path: figures.append(fig) or path)
    records = []
    for method in BASE:
        rep = {"quantized": {f: {str(d): {"map@10": 0.5, "1nn": 0.6} for d in SIZES} for f in BASE[method]}}
        records += report_records(rep, method, method, "", 0, method)
    tables = bytes_tables(records)
    write_bytes_figure(tables, tmp_path / "q.png")
    map_ax, one_nn_ax = figures[0].axes
    assert one_nn_ax.get_xlabel() == map_ax.get_xlabel() == "bytes per stored vector"
    assert map_ax.get_xscale() == "log" and map_ax.xaxis.get_transform().base == 2
    labels = {bars.get_label(): bars.lines[0] for bars in map_ax.containers}
    assert set(labels) == {f"{m} ({f})" for m in BASE for f in BASE[m]}
    assert list(labels["mrl (binary)"].get_xdata()) == [1, 2]
    # colour says the method, marker the format
    assert labels["mrl (int8)"].get_color() == labels["mrl (binary)"].get_color()
    assert labels["mrl (int8)"].get_marker() == labels["standard (int8)"].get_marker()
    assert len(best_at_budgets(tables)) == 2 * len({1, 2, 8, 16, 32, 64})
    # the legend names every line, those of the 1-NN panel only too
    tables["1nn"]["svd (float32)"] = tables["1nn"]["mrl (int8)"]
    write_bytes_figure(tables, tmp_path / "q.png")
    legend = [text.get_text() for text in figures[1].axes[0].get_legend().get_texts()]
    assert set(legend) == {*labels, "svd (float32)"} and len(legend) == len(labels) + 1
