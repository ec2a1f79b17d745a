"""``mrl-eval`` end to end on a real tiny ``mrl-train`` checkpoint, and its bad-input messages."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from support import (
    TINY,
    CLIResult,
    reference_binary,
    reference_int8,
    reference_metrics,
    run_command,
    wandb_inspect,
    wandb_run_dirs,
)

REPORT_KEYS = {
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
}
SIZES = ["2", "4", "8", "16"]  # the trained sizes of the module's checkpoint, as report.json keys
# small and fast: 4 sizes, 2 classes' worth of rerank, a few funnels
EVAL_FAST = [
    "threads=1",
    "adaptive_classification.num_splits=2",
    "adaptive_retrieval.shortlist_sizes=[4]",
    "adaptive_retrieval.shortlist_k=100",
    "adaptive_retrieval.funnel.shortlist_size=2",
    "adaptive_retrieval.funnel.rerank_sizes=[4,8,full]",
    "adaptive_retrieval.funnel.shortlists=[100,50,10]",
    "baselines.max_train=200",
    "adaptive_retrieval.hnsw=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny mrl-train run (nesting 2, 4, 8, 16) shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("train")
    proc = run_command(
        "mrl-train", *TINY, "head.nesting=[2,4,8,16]", "data.train_size=256", "backbone.embed_dim=16", cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = sorted((tmp / "logs" / "train" / "runs").glob("*"))
    return job


def _in_unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


def _mrl_eval(log_dir: Path, *args: str) -> CLIResult:
    """``mrl-eval`` as run_cli runs it, with its logs under ``log_dir`` (shared by a module's tests)."""
    return run_command("mrl-eval", *args, cwd=log_dir.parent, log_dir=log_dir)


@dataclass
class Evaluated:
    """The module's one evaluation of ``trained``'s last checkpoint with EVAL_FAST: what it printed, its
    output dir and report.json as written then (later reruns in the same dir do not change these)."""

    ckpt: Path
    result: CLIResult
    out: Path
    report: dict
    wandb_runs: list[Path]

    def again(self, *args: str) -> CLIResult:
        """mrl-eval once more on the same checkpoint (same output dir), EVAL_FAST plus ``args``."""
        return _mrl_eval(self.result.log_dir, f"ckpt_path={self.ckpt}", *EVAL_FAST, *args)


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> Evaluated:
    ckpt = trained / "checkpoints" / "last.ckpt"
    log_dir = tmp_path_factory.mktemp("eval") / "logs"
    result = _mrl_eval(log_dir, f"ckpt_path={ckpt}", *EVAL_FAST)
    assert result.returncode == 0, result.output[-3000:]
    (out,) = result.run_dirs("eval")
    report = json.loads((out / "report.json").read_text())
    return Evaluated(ckpt, result, out, report, wandb_run_dirs(out))


@pytest.mark.slow
def test_eval_reports_every_section_at_every_size(evaluated, trained):
    report = evaluated.report
    assert set(report) == REPORT_KEYS
    assert report["robustness"] == {}  # no robustness.sets given (tests/eval/test_robustness.py)
    # a prefix model: every evaluator applies, and there is no sparse search (tests/eval/test_sparse_eval.py)
    assert report["skipped"] == {} and report["sparse_retrieval"] == {}
    assert report["sizes"] == [2, 4, 8, 16]
    assert list(report["linear"]) == list(report["knn"]) == list(report["retrieval"]) == SIZES
    for d in SIZES:
        assert set(report["linear"][d]) == {"top1", "top5"}
        assert set(report["knn"][d]) == {"1nn", "knn"}
        for k in (10, 25, 50, 100):
            for name in ("map", "precision", "recall", "hit"):
                assert _in_unit(report["retrieval"][d][f"{name}@{k}"])
        assert all(_in_unit(v) for v in [*report["linear"][d].values(), *report["knn"][d].values()])
    # the trained heads: the CLI's top-1 of the largest size equals the training run's test accuracy
    train_results = json.loads((trained / "results.json").read_text())
    assert report["linear"]["16"]["top1"] == pytest.approx(train_results["test/acc@16"], abs=1e-6)
    assert "Evaluation of" in evaluated.result.stdout and "exact full-size search" in evaluated.result.stdout


@pytest.mark.slow
def test_eval_adaptive_classification_and_retrieval(evaluated):
    report = evaluated.report
    assert report["adaptive_classification"]
    for row in report["adaptive_classification"]:
        assert {"expected_size", "total_size", "accuracy", "thresholds"} <= set(row)
        assert 2 <= row["expected_size"] <= row["total_size"] <= 2 + 4 + 8 + 16 and _in_unit(row["accuracy"])
    funnels = report["adaptive_retrieval"]
    assert [(r["shortlist_size"], r["rerank_sizes"], r["shortlists"]) for r in funnels] == [
        (2, [4, 8, 16], [100, 50, 10]),
        (4, [16], [100]),
    ]
    for row in funnels:
        assert {"map@10", "top1", "mflops_per_query", "seconds_per_query"} <= set(row)
        assert _in_unit(row["map@10"]) and _in_unit(row["top1"]) and row["seconds_per_query"] > 0
    assert funnels[0]["mflops_per_query"] == pytest.approx((2 * 256 + 100 * 4 + 50 * 8 + 10 * 16) / 1e6)
    exact = report["exact_retrieval"]
    assert {"seconds_per_query", "map@10", "top1"} <= set(exact)
    assert exact["map@10"] == pytest.approx(report["retrieval"]["16"]["map@10"])
    assert exact["top1"] == pytest.approx(report["knn"]["16"]["1nn"])


@pytest.mark.slow
def test_eval_baselines_embeddings_and_plots(evaluated):
    baselines = evaluated.report["baselines"]
    assert list(baselines["svd"]) == SIZES
    assert list(baselines["slice"]) == ["2", "3", "4", "6", "8", "12", "16"]  # + untrained sizes
    # baselines.knn=auto: no 1-NN of the reductions for an MRL model (its prefixes' 1-NN is in "knn")
    assert baselines["svd_1nn"] == {} and baselines["slice_1nn"] == {}
    # exported embeddings: the database (train) and query (test) splits
    out = evaluated.out
    emb = np.load(out / "train_embeddings.npy")
    labels = np.load(out / "train_labels.npy")
    assert emb.shape == (256, 16) and emb.dtype == np.float32 and labels.shape == (256,)
    assert np.load(out / "test_embeddings.npy").shape == (64, 16)
    for png in ("acc_vs_size.png", "adaptive_classification.png", "adaptive_retrieval.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_eval_logs_a_wandb_run_in_the_training_runs_group(evaluated, trained):
    """One eval run in the training run's group, with the tables and summary numbers."""
    (run_dir,) = evaluated.wandb_runs
    report = evaluated.report
    summary, history = wandb_inspect(run_dir)
    assert summary["config"]["group"] == trained.name
    assert summary["summary"]["eval/linear/top1@16"] == pytest.approx(report["linear"]["16"]["top1"])
    assert summary["summary"]["eval/retrieval/map@10@8"] == pytest.approx(report["retrieval"]["8"]["map@10"])
    logged = {k for row in history for k in row}
    for table in ("eval/per_size", "eval/adaptive_classification", "eval/adaptive_retrieval"):
        assert f"{table}._type" in logged, sorted(logged)
    per_size_rows = next(row[k] for row in history for k in row if k == "eval/per_size.nrows")
    assert per_size_rows == 7


@pytest.mark.slow
def test_eval_again_reuses_the_exported_embeddings(evaluated):
    """A second call on the same checkpoint: same output dir, embedding files untouched."""
    out = evaluated.out
    mtime = (out / "train_embeddings.npy").stat().st_mtime_ns
    again = evaluated.again("methods.baselines=false")
    assert again.returncode == 0, again.output[-3000:]
    assert again.run_dirs("eval") == [out]
    assert (out / "train_embeddings.npy").stat().st_mtime_ns == mtime
    assert "Reusing train embeddings" in again.output
    assert json.loads((out / "report.json").read_text())["baselines"] == {
        "svd": {},
        "slice": {},
        "svd_1nn": {},
        "slice_1nn": {},
    }


@pytest.mark.slow
def test_eval_baselines_knn_true_adds_the_reductions_one_nn(evaluated):
    """baselines.knn=true: the 1-NN of the reductions too; a truncation at a trained size is the kNN
    section's 1-NN (taken from it), an untrained size is searched. A bad value changes nothing."""
    only_knn_and_baselines = [f"methods.{m}=false" for m in ("linear", "adaptive_classification")]
    only_knn_and_baselines += ["methods.adaptive_retrieval=false", "logger=none"]
    forced = evaluated.again("baselines.knn=true", *only_knn_and_baselines)
    assert forced.returncode == 0, forced.output[-3000:]
    report = json.loads((evaluated.out / "report.json").read_text())
    one_nn = report["baselines"]["slice_1nn"]
    assert list(one_nn) == ["2", "3", "4", "6", "8", "12", "16"]
    assert all(one_nn[d] == report["knn"][d]["1nn"] for d in SIZES)
    assert list(report["baselines"]["svd_1nn"]) == SIZES
    bad = evaluated.again("baselines.knn=sometimes", "logger=none")
    assert bad.returncode != 0 and "baselines.knn must be true, false or auto" in bad.output
    assert json.loads((evaluated.out / "report.json").read_text()) == report  # untouched by the failed call


@pytest.mark.slow
def test_eval_float16_and_bad_sizes_and_split(run_cli, run_main, trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    fast = [
        *EVAL_FAST,
        "methods.baselines=false",
        "methods.adaptive_retrieval=false",
        "methods.adaptive_classification=false",
    ]
    half = run_cli(
        "mrl-eval", f"ckpt_path={ckpt}", *fast, "embedding_dtype=float16", "sizes=[4,16]", "query_split=val"
    )
    assert half.returncode == 0, half.output[-3000:]
    (out,) = half.run_dirs("eval")
    assert np.load(out / "val_embeddings.npy").dtype == np.float16
    report = json.loads((out / "report.json").read_text())
    assert report["sizes"] == [4, 16] and list(report["knn"]) == ["4", "16"]
    assert report["adaptive_retrieval"] == [] and report["exact_retrieval"] == {}

    for args, words in (
        (["sizes=[4,12]"], ["not trained", "[12]", "[2, 4, 8, 16]"]),
        (["sizes=[4,64]"], ["exceed the embedding size 16"]),
        (["database_split=holdout"], ["no 'holdout' split", "database_split"]),
    ):
        bad = run_main("mrl-eval", f"ckpt_path={ckpt}", *fast, *args)
        assert bad.returncode != 0
        assert "Traceback" not in bad.output
        for word in words:
            assert word in bad.stderr, bad.stderr


@pytest.mark.slow
def test_more_neighbours_than_the_database_has_are_refused_before_any_embedding(run_main, trained, tmp_path):
    """The training run's data config says its train split (the database) has 256 items: retrieval.ks up
    to 300 is refused once the checkpoint is read, before the embeddings are computed (it used to be
    refused by the search, after the export)."""
    ckpt = trained / "checkpoints" / "last.ckpt"
    bad = run_main("mrl-eval", f"ckpt_path={ckpt}", *EVAL_FAST, "retrieval.ks=[10,300]")
    assert bad.returncode == 1 and "Traceback" not in bad.output, bad.output[-3000:]
    for words in ("has 256 items (data.train_size=256)", "retrieval.ks=[10, 300] (300)", "at most 256"):
        assert words in bad.stderr, bad.stderr
    assert not list(tmp_path.rglob("*_embeddings.npy")) and not list(tmp_path.rglob("report.json"))


def test_missing_checkpoint(run_main, tmp_path):
    result = run_main("mrl-eval", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.output
    assert not list((tmp_path / "logs" / "eval" / "runs").glob("*/report.json"))


def test_corrupt_checkpoint(run_main, tmp_path):
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run_main("mrl-eval", f"ckpt_path={ckpt}")
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "Traceback" not in result.output


def test_checkpoint_without_mrl_config(run_main, tmp_path):
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    result = run_main("mrl-eval", f"ckpt_path={ckpt}")
    assert result.returncode != 0
    assert "no mrl training config" in result.stderr and "Traceback" not in result.output


def test_eval_config_composes_with_the_paper_defaults():
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=/runs/2026-01-01_00-00-00_abc123/checkpoints/last.ckpt"])
    funnel = cfg.adaptive_retrieval.funnel
    assert funnel.shortlist_size == 8 and list(funnel.rerank_sizes) == [16, 32, 64, 128, "full"]
    assert list(funnel.shortlists) == [200, 100, 50, 25, 10]
    assert list(cfg.retrieval.ks) == [10, 25, 50, 100] and cfg.sizes is None
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.group is None
    assert cfg.logger.wandb.job_type == "eval" and cfg.embedding_dtype == "float32"


def test_bad_checkpoints_in_process(tmp_path):
    """The same checks without a subprocess (fast suite): each is an MRLError saying what to do."""
    from mrl.errors import MRLError
    from mrl.eval.model import load_for_eval
    from mrl.eval.run import report_sizes

    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 garbage")
    torch.save({"state_dict": {}, "mrl_config": {"data": {}}}, tmp_path / "partial.ckpt")
    for name, words in (
        ("nope.ckpt", "does not exist"),
        ("broken.ckpt", "corrupt"),
        ("partial.ckpt", "no mrl training config"),
    ):
        with pytest.raises(MRLError, match=words):
            load_for_eval(tmp_path / name)
    assert report_sizes(None, [2, 4, 8], 8) == [2, 4, 8]
    assert report_sizes([8, 2], [2, 4, 8], 8) == [2, 8]
    with pytest.raises(MRLError, match=r"not trained at: \[3\]"):
        report_sizes([3], [2, 4, 8], 8)
    with pytest.raises(MRLError, match="exceed the embedding size 8"):
        report_sizes([16], [2, 4, 8], 8)


def test_report_plots_and_tables_without_k10(tmp_path):
    """retrieval.ks=[2] (a tiny database): plots, the per-size table and the summary use mAP@2."""
    from mrl.eval.plots import write_plots
    from mrl.eval.report_file import build_report, per_size_rows, retrieval_k
    from mrl.eval.summary import summary_text

    sections = {
        "linear": {"4": {"top1": 0.7, "top5": 0.9}},
        "knn": {"4": {"1nn": 0.6, "knn": 0.65}},
        "retrieval": {"4": {"map@2": 0.5, "precision@2": 0.5, "recall@2": 0.25, "hit@2": 1.0}},
    }
    rep = build_report([4], sections, {})
    assert retrieval_k(rep) == 2
    pngs = write_plots(rep, tmp_path)
    assert [p.name for p in pngs] == ["acc_vs_size.png"]
    columns, rows = per_size_rows(rep)
    assert rows[0][columns.index("map@2")] == 0.5 and rows[0][columns.index("recall@2")] == 0.25
    assert "50.00" in summary_text(rep)


def _copy_run(job: Path, dest: Path, shift: float = 0.0) -> Path:
    """A copy of a training run at ``dest``; ``shift`` changes its weights (another model, same names)."""
    shutil.copytree(job, dest, ignore=shutil.ignore_patterns("wandb", "eval"))
    ckpt = dest / "checkpoints" / "last.ckpt"
    if shift:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for key, value in state["state_dict"].items():
            if key.startswith("head.") and value.is_floating_point():
                value.add_(shift)
        torch.save(state, ckpt)
    return ckpt


EVAL_QUICK = [
    *EVAL_FAST,
    "methods.adaptive_classification=false",
    "methods.adaptive_retrieval=false",
    "methods.baselines=false",
]


@pytest.mark.slow
def test_evaluations_of_two_runs_with_the_same_job_name_never_share_a_place(
    run_cli, run_main, trained, tmp_path
):
    """Job 0 of sweep A and job 0 of sweep B: each evaluation has its own place and model, a rerun reuses
    its embeddings, and pointing one at the other's place is refused without touching it."""
    import mrl
    from mrl.eval.locations import find_evaluations

    ckpt_a = _copy_run(trained, tmp_path / "sweep_a" / "0")
    ckpt_b = _copy_run(trained, tmp_path / "sweep_b" / "0", shift=0.5)
    outs: dict[str, Path] = {}
    for name, ckpt in (("a", ckpt_a), ("b", ckpt_b)):
        result = run_cli("mrl-eval", f"ckpt_path={ckpt}", *EVAL_QUICK)
        assert result.returncode == 0, result.output[-3000:]
        (outs[name],) = set(result.run_dirs("eval")) - set(outs.values())
    assert (
        outs["a"] != outs["b"]
        and outs["a"].name.startswith("0_last-")
        and outs["b"].name.startswith("0_last-")
    )
    for name, ckpt in (("a", ckpt_a), ("b", ckpt_b)):
        report = json.loads((outs[name] / "report.json").read_text())
        assert report["checkpoint"]["path"] == str(ckpt.absolute())
        # the exported model is this checkpoint's: its head equals the checkpoint's head
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model = mrl.load(outs[name] / "model.safetensors")
        for key, value in model.head.state_dict().items():
            assert torch.equal(value, stored[f"head.{key}"])
        # the training run finds its evaluation through the link mrl-eval left there
        assert find_evaluations(ckpt.parent.parent) == [(outs[name] / "report.json").resolve()]

    again = run_cli("mrl-eval", f"ckpt_path={ckpt_a}", *EVAL_QUICK)
    assert again.returncode == 0 and "Reusing" in again.output, again.output[-3000:]
    assert again.run_dirs("eval") == sorted(outs.values())

    before = {p: p.read_bytes() for p in outs["b"].rglob("*") if p.is_file()}
    refused = run_main("mrl-eval", f"ckpt_path={ckpt_a}", f"hydra.run.dir={outs['b']}", *EVAL_QUICK)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "holds the evaluation of another checkpoint" in refused.stderr
    assert {p: p.read_bytes() for p in outs["b"].rglob("*") if p.is_file()} == before


def test_evaluation_places_are_unique_to_the_checkpoint_content(tmp_path):
    from mrl.cli.eval import eval_dir_name
    from mrl.eval.locations import checkpoint_id

    first = tmp_path / "a" / "0" / "checkpoints" / "last.ckpt"
    second = tmp_path / "b" / "0" / "checkpoints" / "last.ckpt"
    for path, content in ((first, b"one"), (second, b"two")):
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    assert eval_dir_name(str(first)) == f"0_last-{checkpoint_id(first)}"
    assert eval_dir_name(str(first)) != eval_dir_name(str(second))
    assert eval_dir_name(str(first)) == eval_dir_name(str(first))  # stable: reruns reuse the place
    before = eval_dir_name(str(first))
    first.write_bytes(b"one, trained further")  # a resumed run rewrote last.ckpt: a new place
    assert eval_dir_name(str(first)) not in (before, eval_dir_name(str(second)))


@pytest.mark.slow
def test_eval_quantized_prefixes_in_the_report_png_and_wandb(evaluated):
    """Each size stored as float32, int8 and sign bits: exact bytes per vector, float32 = the exact
    search's numbers, int8 and binary recomputed from the exported embeddings by hand; quantized.png, the
    W&B table and summary; an unknown format refused before anything is written."""
    report, out = evaluated.report, evaluated.out
    quant = report["quantized"]
    assert list(quant) == ["float32", "int8", "binary"] and all(
        list(rows) == SIZES for rows in quant.values()
    )
    db, db_y = np.load(out / "train_embeddings.npy"), np.load(out / "train_labels.npy")
    q, q_y = np.load(out / "test_embeddings.npy"), np.load(out / "test_labels.npy")
    for d in SIZES:
        n = int(d)
        assert [quant[fmt][d]["bytes"] for fmt in quant] == [4 * n, n, -(-n // 8)]
        assert quant["float32"][d] == {
            "bytes": 4 * n,
            "map@10": report["retrieval"][d]["map@10"],
            "1nn": report["knn"][d]["1nn"],
        }
        ids = np.argsort(reference_binary(db, q, n, "zero"), axis=1, kind="stable")[:, :10]
        assert quant["binary"][d] == pytest.approx(
            {"bytes": -(-n // 8), **reference_metrics(ids, db_y, q_y, 10)}
        )
        if n > 2:  # d=2: int8 codes of distinct items can coincide, and tied items come in faiss's order
            ids = np.argsort(-reference_int8(db, q, n)[1], axis=1, kind="stable")[:, :10]
            assert quant["int8"][d] == pytest.approx({"bytes": n, **reference_metrics(ids, db_y, q_y, 10)})
    assert (out / "quantized.png").stat().st_size > 1000
    assert "quantized prefixes" in evaluated.result.output
    (run_dir,) = evaluated.wandb_runs
    summary, history = wandb_inspect(run_dir)
    assert summary["summary"]["eval/quantized/binary/map@10@16"] == pytest.approx(
        quant["binary"]["16"]["map@10"]
    )
    assert summary["summary"]["eval/quantized/int8/bytes@8"] == 8
    logged = {k: v for row in history for k, v in row.items()}
    assert logged["eval/quantized._type"] == "table-file" and logged["eval/quantized.nrows"] == 12
    assert "eval/quantized_png._type" in logged and "eval/quantized_chart_table._type" in logged
    written = (out / "report.json").read_text()
    bad = evaluated.again("quantized.formats=[int8,int4]", "logger=none")
    assert bad.returncode != 0 and "Traceback" not in bad.output
    assert "quantized.formats=['int8', 'int4']" in bad.stderr and "among int8, binary" in bad.stderr
    assert (out / "report.json").read_text() == written
