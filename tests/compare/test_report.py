"""mrl-report: tables, claims and figure from a sweep, checked against the jobs' own results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mrl.compare.claims import check_claims
from mrl.compare.collect import Record, collect, variant_labels
from mrl.compare.table import Cell, aggregate, markdown
from mrl.compare.wandb_source import run_records
from mrl.eval.locations import find_evaluations
from support import TINY, read_results, wandb_inspect
from support import top1_results as _top1
from support import write_evaluation as _evaluate
from support import write_job_dir as _job

CHEAP_EVAL = (
    "evaluate={methods: {adaptive_classification: false, adaptive_retrieval: false}, "
    "baselines: {interpolation: false, max_iter: 20, sizes: [1, 2, 4, 8]}, "
    "knn: {k: 3}, retrieval: {ks: [10]}}"
)


def test_aggregate_mean_and_sample_std_over_seeds():
    records = [
        Record("mrl", 4, "top1", 0.80, 0, "a"),
        Record("mrl", 4, "top1", 0.90, 1, "b"),
        Record("ff", 4, "top1", 0.70, 0, "c"),
    ]
    tables = aggregate(records)
    cell = tables["top1"]["mrl"][4]
    assert cell.mean == pytest.approx(85.0)
    assert cell.std == pytest.approx(((5.0**2 + 5.0**2) / 1) ** 0.5)
    assert cell.n == 2
    assert tables["top1"]["ff"][4] == Cell(70.0, 0.0, 1)
    assert list(tables["top1"]) == ["mrl", "ff"]  # the paper's method order
    text = markdown(tables)
    assert "| mrl | 85.00 ± 7.07 |" in text and "| ff | 70.00 |" in text


def _tables(top1: dict[str, dict[int, float]]) -> dict:
    return {"top1": {m: {d: Cell(v, 0.0, 2) for d, v in row.items()} for m, row in top1.items()}, "1nn": {}}


def test_claims_follow_the_numbers():
    good = _tables(
        {
            "mrl": {1: 60.0, 2: 70.0, 4: 90.0, 8: 91.0},
            "mrl_e": {1: 55.0, 2: 69.0, 4: 89.0, 8: 90.0},
            "ff": {1: 60.5, 2: 70.9, 4: 90.2, 8: 91.0},
            "slice": {1: 19.0, 2: 42.0, 4: 68.0, 8: 79.0},
            "svd": {1: 44.0, 2: 69.0, 4: 83.0, 8: 89.0},
        }
    )
    assert [c.holds for c in check_claims(good)] == [True, True, True, True]
    bad = _tables({**{k: dict(v) for k, v in {"mrl": {1: 58.0, 2: 70.0}, "ff": {1: 60.0, 2: 70.0}}.items()}})
    first = check_claims(bad)[0]
    assert first.holds is False and "d=1: -2.00" in first.detail


def _claim(claims, words: str):
    (claim,) = [c for c in claims if words in c.text]
    return claim


def test_each_claim_states_and_checks_one_inequality():
    """The text names the inequality per size; the verdict is exactly that inequality, in both directions
    (a model far above the one it is compared with passes a one-sided "at most N below" claim)."""
    tables = _tables(
        {
            "mrl": {1: 60.0, 2: 70.0, 4: 80.0, 8: 91.0, 16: 92.0},
            "mrl_e": {4: 87.6, 8: 88.9, 16: 92.0},  # +7.60, -2.10, 0.00
            "ff": {1: 65.0, 2: 69.5},  # MRL -5.00 and +0.50
            "slice": {1: 40.0, 2: 50.0},  # exactly +20.00 at both
            "svd": {1: 59.0, 2: 70.0},  # +1.00, then equal: not above
        }
    )
    claims = check_claims(tables)
    ff = _claim(claims, "below FF")
    assert "at most 1 point below FF" in ff.text and "(mrl - ff >= -1)" in ff.text
    assert ff.holds is False and "d=1: -5.00, d=2: +0.50" in ff.detail
    assert "not measured at d=4, d=8, d=16" in ff.detail
    mrl_e = _claim(claims, "MRL-E")
    assert (
        "at most 2 points below MRL at each size >= 4" in mrl_e.text and "(mrl_e - mrl >= -2)" in mrl_e.text
    )
    assert mrl_e.holds is False and "d=4: +7.60, d=8: -2.10, d=16: +0.00" in mrl_e.detail
    truncation = _claim(claims, "truncation")
    assert "(mrl - slice >= 20)" in truncation.text and truncation.holds is True
    svd = _claim(claims, "PCA/SVD")
    assert "(mrl - svd > 0)" in svd.text and svd.holds is False and "d=2: +0.00" in svd.detail

    tables["top1"]["mrl_e"][8] = Cell(89.0, 0.0, 2)  # -2.00: at most 2 below
    assert _claim(check_claims(tables), "MRL-E").holds is True
    tables["top1"]["ff"] = {1: Cell(55.0, 0.0, 2), 2: Cell(69.0, 0.0, 2)}  # MRL +5.00 above FF: holds
    assert _claim(check_claims(tables), "below FF").holds is True


def test_missing_numbers_are_not_measured_never_a_failure():
    claims = check_claims(_tables({"mrl": {1: 50.0, 2: 60.0}}))
    assert claims and all(c.holds is None for c in claims), claims
    assert not [c for c in claims if "1-NN" in c.text]  # no claim about coverage: the jobs list says it
    from mrl.compare.claims import claims_markdown

    text = claims_markdown(claims)
    assert "does not hold" not in text and text.count("not measured") >= len(claims)
    # truncation measured at one of MRL's two smallest sizes only: undecided, whatever that one says
    partial = check_claims(_tables({"mrl": {1: 50.0, 2: 60.0}, "slice": {2: 59.0}}))
    truncation = _claim(partial, "truncation")
    assert truncation.holds is None and "not measured at d=1" in truncation.detail
    assert check_claims({})[0].holds is None


def test_weighted_mrl_is_its_own_row_with_its_own_claims():
    from mrl.compare.collect import method_label

    assert method_label({"kind": "mrl", "weights": [4, 2, 1, 1]}) == "mrl [w=4,2,1,1]"
    assert method_label({"kind": "mrl", "weights": [1, 1, 1]}) == "mrl"  # even weights: plain MRL
    assert method_label({"kind": "mrl_e"}) == "mrl_e"
    tables = _tables(
        {
            "mrl": {1: 58.0, 2: 70.0, 4: 90.0},
            "mrl [w=4,2,1]": {1: 60.0, 2: 70.5, 4: 89.9},
            "ff": {1: 60.5, 2: 70.9, 4: 90.2},
            "slice": {1: 19.0, 2: 42.0, 4: 68.0},
            "svd": {1: 44.0, 2: 69.0, 4: 83.0},
        }
    )
    claims = check_claims(tables)
    ff_claims = [c for c in claims if "below FF" in c.text]
    assert [c.holds for c in ff_claims] == [False, True]  # plain MRL misses d=1, the weighted one holds
    assert "mrl [w=4,2,1] - ff" in ff_claims[1].text and "d=1: -0.50" in ff_claims[1].detail
    slice_claims = [c for c in claims if "truncation" in c.text]
    assert len(slice_claims) == 2 and "d=1: +41.00" in slice_claims[1].detail


def _seed_records(per_method: dict[str, dict[int, list[float]]]) -> list[Record]:
    return [
        Record(method, d, "top1", v, seed, f"{method}-{seed}")
        for method, row in per_method.items()
        for d, values in row.items()
        for seed, v in enumerate(values)
    ]


def test_a_missed_claim_says_whether_the_miss_exceeds_the_seed_noise():
    """MRL below FF at d=1 by 3 points with a 9-point spread over seeds: within the noise; at d=2 by 2
    points with a 0.2-point spread: a real miss. p-values as scipy's Welch test computes them."""
    from scipy import stats

    from mrl.compare.significance import p_value

    mrl = {1: [0.632, 0.723, 0.541, 0.700, 0.488], 2: [0.861, 0.863, 0.859, 0.860, 0.862], 4: [0.9] * 5}
    ff = {1: [0.661, 0.648, 0.675, 0.659, 0.680], 2: [0.881, 0.879, 0.883, 0.880, 0.882], 4: [0.9] * 5}
    claims = check_claims(aggregate(_seed_records({"mrl": mrl, "ff": ff})))
    ff_claim = _claim(claims, "below FF")
    assert ff_claim.holds is False
    d1, d2 = ff_claim.noise.split("; ")
    pct = {d: ([100 * v for v in mrl[d]], [100 * v for v in ff[d]]) for d in (1, 2)}
    p1 = stats.ttest_ind(*pct[1], equal_var=False).pvalue
    p1_bound = stats.ttest_ind([v + 1 for v in pct[1][0]], pct[1][1], equal_var=False).pvalue
    gap = sum(pct[1][0]) / 5 - sum(pct[1][1]) / 5
    se = (stats.tstd(pct[1][0]) ** 2 / 5 + stats.tstd(pct[1][1]) ** 2 / 5) ** 0.5
    assert d1.startswith(f"d=1: {gap:+.2f} ± {se:.2f} (standard error")
    assert f"p={p1:.2f} against no difference, p={p1_bound:.2f} against -1: within the seeds' noise" in d1
    p2_bound = stats.ttest_ind([v + 1 for v in pct[2][0]], pct[2][1], equal_var=False).pvalue
    assert p2_bound < 0.05 and f"{p_value(p2_bound)} against -1: misses the bound by more than" in d2
    assert "d=4" not in ff_claim.noise  # only the sizes that miss are tested
    from mrl.compare.claims import claims_markdown

    assert f"; seed noise: {ff_claim.noise}" in claims_markdown(claims)
    one_seed = check_claims(aggregate(_seed_records({"mrl": {1: [0.5]}, "ff": {1: [0.6, 0.62]}})))
    assert "d=1: fewer than 2 seeds on a side, no noise estimate" in _claim(one_seed, "below FF").noise


def test_a_method_has_one_colour_in_every_panel(tmp_path, monkeypatch):
    """The 1-NN panel lacks the MRL-E row here; FF must keep its top-1 colour, not take MRL-E's."""
    from mrl.compare.figure import write_figure
    from mrl.tracking import charts

    figures = []
    monkeypatch.setattr(charts, "save_figure", lambda fig, path: figures.append(fig) or path)
    records = [
        Record(method, 1, metric, 0.5, 0, method)
        for method in ("mrl", "ff", "mrl_e")
        for metric in ("top1", "1nn")
        if not (method == "mrl_e" and metric == "1nn")
    ]
    write_figure(aggregate(records), tmp_path / "c.png")
    colours = [
        {bars.get_label(): bars.lines[0].get_color() for bars in ax.containers} for ax in figures[0].axes
    ]
    top1, one_nn = colours
    assert set(top1) == {"MRL", "MRL-E", "FF"} and set(one_nn) == {"MRL", "FF"}
    assert one_nn["FF"] == top1["FF"] != top1["MRL-E"] and one_nn["MRL"] == top1["MRL"]


def _report(one_nn: dict[int, float], baselines: dict | None = None) -> dict:
    """A report.json of mrl-eval: 1-NN and mAP@10 (1-NN minus 0.1) per size, optional baselines."""
    return {
        "knn": {str(d): {"1nn": v, "knn": v} for d, v in one_nn.items()},
        "retrieval": {str(d): {"map@10": v - 0.1} for d, v in one_nn.items()},
        "baselines": baselines or {},
    }


def test_report_reads_the_evaluations_of_every_layout(tmp_path, monkeypatch):
    """evaluate= (eval/<ckpt>-<id>/), mrl-eval (linked from eval/<ckpt>-<id>.json), old eval/report.json."""
    from mrl.compare.collect import collect_jobs

    sweep = tmp_path / "train" / "multiruns" / "sweep"
    written = []
    for seed, (layout, one_nn) in enumerate([("evaluate", 0.80), ("mrl-eval", 0.84), ("old", 0.88)]):
        job = _job(sweep / str(seed), {"kind": "mrl"}, seed, _top1({4: 0.9}))
        written.append(_evaluate(job, _report({4: one_nn}), layout))
    records = collect(sweep)
    cell = aggregate(records)["1nn"]["mrl"][4]
    assert cell.n == 3 and cell.mean == pytest.approx(84.0)
    assert aggregate(records)["map@10"]["mrl"][4].mean == pytest.approx(74.0)
    monkeypatch.chdir(tmp_path)  # a relative sweep path: the jobs' own reports still show relative to it
    infos = collect_jobs(Path("train/multiruns/sweep"))[1]
    assert [i.eval_report for i in infos] == [
        str(written[0].relative_to(sweep)),
        str(written[1]),
        "2/eval/report.json",
    ]
    assert [i.checkpoint for i in infos] == ["0/checkpoints/last.ckpt", "1/checkpoints/last.ckpt", None]


def test_the_newest_evaluation_of_a_job_counts_once_and_is_named(tmp_path):
    from mrl.compare.collect import collect_jobs

    sweep = tmp_path / "train" / "multiruns" / "sweep"
    job = _job(sweep / "0", {"kind": "mrl"}, 0, _top1({4: 0.9}))
    _evaluate(job, _report({4: 0.5}), "evaluate", ckpt="epoch003", mtime=1_000_000)
    newest = _evaluate(job, _report({4: 0.7}), "mrl-eval", ckpt="last", mtime=2_000_000)
    records, (info,) = collect_jobs(sweep)
    assert [r.value for r in records if r.metric == "1nn"] == [0.7]  # one evaluation, not averaged as seeds
    assert info.evaluations == 2
    assert info.eval_report == str(newest) and info.checkpoint == "0/checkpoints/last.ckpt"
    assert find_evaluations(job)[0] == newest.resolve()


def _reported(sweep: Path, capsys) -> tuple[str, dict]:
    """mrl-report on ``sweep`` (no W&B run): what it printed, and comparison.json."""
    from mrl.cli.report import main

    main([str(sweep), "--no-wandb"])
    printed = capsys.readouterr().out
    assert printed.startswith((sweep / "report" / "comparison.md").read_text())
    return printed, json.loads((sweep / "report" / "comparison.json").read_text())


def test_mrl_report_after_mrl_eval_checks_the_claims_on_its_numbers(tmp_path, capsys):
    """The order docs/evaluation.md shows: train a sweep, mrl-eval each checkpoint, mrl-report. No false
    failure for 1-NN."""
    sweep = tmp_path / "train" / "multiruns" / "sweep"
    sizes = {1: 0.6, 2: 0.8, 4: 0.9}
    jobs = [
        _job(sweep / "0", {"kind": "mrl"}, 0, _top1(sizes)),
        _job(sweep / "1", {"kind": "mrl"}, 1, _top1(sizes)),
        _job(sweep / "2", {"kind": "ff", "dim": 1}, 0, _top1({1: 0.6})),
        _job(sweep / "3", {"kind": "standard"}, 0, _top1({4: 0.9})),
    ]
    baselines = {"svd": {"1": 0.3, "2": 0.5}, "slice": {"1": 0.2, "2": 0.4}, "svd_1nn": {"1": 0.25}}
    for job in jobs:
        _evaluate(job, _report({1: 0.5, 4: 0.8}, baselines if job.name == "3" else None), "mrl-eval")
    printed, summary = _reported(sweep, capsys)
    assert "does not hold" not in printed, printed
    assert set(summary["tables"]["1nn"]) == {"mrl", "ff", "standard", "svd"}
    assert summary["tables"]["1nn"]["mrl"]["1"] == {"mean": 50.0, "std": 0.0, "n": 2, "values": [50.0, 50.0]}
    assert summary["tables"]["top1"]["slice"]["2"]["mean"] == pytest.approx(40.0)
    assert [c["holds"] for c in summary["claims"]] == [True, None, True, True], summary["claims"]
    assert "MRL-E top-1 at most 2 points below MRL" in printed
    assert "(mrl_e - mrl >= -2): not measured (mrl_e not measured)" in printed
    for info in summary["jobs"]:  # where each job's eval numbers came from
        assert info["evaluations"] == 1 and "/eval/runs/" in info["eval_report"], info
        assert info["checkpoint"] == f"{info['job']}/checkpoints/last.ckpt"
    assert "| 3 | standard | 0 | test | 1 |" in printed


def test_jobs_without_results_or_test_metrics_are_listed_not_dropped(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _evaluate(_job(sweep / "0", {"kind": "mrl"}, 0, _top1({4: 0.9})), _report({4: 0.8}), "evaluate")
    _job(sweep / "1", {"kind": "mrl"}, 1, _top1({4: 0.5}, split="val"), ("test=false",))
    _job(sweep / "2", {"kind": "mrl"}, 2, None)  # unfinished or failed: no results.json
    printed, summary = _reported(sweep, capsys)
    assert summary["tables"]["top1"]["mrl"]["4"] == {
        "mean": 90.0,
        "std": 0.0,
        "n": 1,
        "values": [90.0],
    }  # test
    assert summary["tables"]["val_top1"]["mrl"]["4"]["mean"] == pytest.approx(50.0)
    assert "Comparison of 3 jobs" in printed and "**Validation top-1 accuracy (%)**" in printed
    assert "- no results.json (unfinished or failed), so no top-1: 2" in printed
    assert "- no test metrics, top-1 of the validation split in its own table: 1" in printed
    assert "- no evaluation found, so no 1-NN, mAP@10 or baselines: 1, 2" in printed
    by_job = {info["job"]: info for info in summary["jobs"]}
    assert (by_job["1"]["top1"], by_job["2"]["results"], by_job["2"]["top1"]) == ("val", False, "none")


def test_a_sweep_with_no_finished_job_says_so(tmp_path, run_main):
    _job(tmp_path / "sweep" / "0", {"kind": "mrl"}, 0, None)
    res = run_main("mrl-report", str(tmp_path / "sweep"), "--no-wandb")
    assert res.returncode == 1 and "None of the 1 jobs" in res.stderr and "has finished" in res.stderr


def test_overrides_that_cannot_change_the_model_make_no_variant(tmp_path):
    incidental = (
        "evaluate={methods: {knn: true}, knn: {k: 3}}",
        "logger=csv",
        "+logger.wandb.offline=false",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "threads=1",
        "compile=true",
        "paths.log_dir=/elsewhere",
        "hydra.run.dir=/elsewhere/run",
        "progress_bar_refresh_s=5",
        "checkpoint_every_n_steps=10",
        "data.num_workers=4",
        "test=false",
        "trainer.max_epochs=4",  # what the other jobs resolved without the override
    )
    jobs = [
        _job(tmp_path / "0", {"kind": "mrl"}, 0, {}, ("head={kind:mrl}", *incidental)),
        _job(tmp_path / "1", {"kind": "ff", "dim": 4}, 1, {}, ("head={kind:ff,dim:4}",)),
        _job(tmp_path / "2", {"kind": "mrl", "weights": [4, 1]}, 0, {}, ("head.weights=[4,1]",)),
    ]
    assert variant_labels(jobs) == {job: "" for job in jobs}
    longer = _job(tmp_path / "3", {"kind": "mrl"}, 0, {}, ("trainer.max_epochs=8", "backbone=resnet50"))
    (longer / "resolved_config.yaml").write_text(yaml.safe_dump({"seed": 0, "trainer": {"max_epochs": 8}}))
    labels = variant_labels([*jobs, longer])
    assert labels[longer] == "backbone=resnet50,trainer.max_epochs=8"
    assert labels[jobs[0]] == "backbone=default,trainer.max_epochs=4"  # given explicitly, or the default


def test_embedding_variants_are_rows_of_their_own_checked_against_their_own_baselines(tmp_path, capsys):
    """fashion_mnist_relu_baselines: standard and MRL with the linear 64-d embedding and without it
    (backbone.embed_dim=null). Each kind is its own row, its baselines come from its own standard model,
    and each claim names the baseline it compares."""
    sweep = tmp_path / "sweep"
    kinds = {"64": (64, 0.6, 0.45), "null": (None, 0.3, 0.10)}  # (embed_dim, MRL d=1, truncation d=1)
    for i, (kind, (embed_dim, mrl_d1, slice_d1)) in enumerate(kinds.items()):
        for seed in (0, 1):
            override = (f"backbone.embed_dim={kind}",)
            backbone = {"embed_dim": embed_dim, "name": "test_byobnet"}
            mrl = _job(
                sweep / f"{i}{seed}m",
                {"kind": "mrl"},
                seed,
                _top1({1: mrl_d1, 2: 0.8}),
                override,
                backbone=backbone,
            )
            _evaluate(mrl, _report({1: 0.2}), "evaluate")
            standard = _job(
                sweep / f"{i}{seed}s",
                {"kind": "standard"},
                seed,
                _top1({256: 0.9}),
                override,
                backbone=backbone,
            )
            baselines = {"slice": {"1": slice_d1, "2": 0.5}, "svd": {"1": slice_d1 + 0.05, "2": 0.7}}
            _evaluate(standard, _report({256: 0.88}, baselines), "evaluate")
    printed, summary = _reported(sweep, capsys)
    top1 = summary["tables"]["top1"]
    assert top1["mrl [backbone.embed_dim=64]"]["1"]["mean"] == pytest.approx(60.0)
    assert top1["mrl [backbone.embed_dim=null]"]["1"]["mean"] == pytest.approx(30.0)
    assert top1["slice [backbone.embed_dim=64]"]["1"]["mean"] == pytest.approx(45.0)
    assert top1["slice [backbone.embed_dim=null]"]["1"]["mean"] == pytest.approx(10.0)
    assert top1["standard [backbone.embed_dim=null]"]["256"]["n"] == 2
    assert "mrl" not in top1 and "slice" not in top1  # no row mixing the two kinds
    assert "| slice [backbone.embed_dim=null] | 10.00 ± 0.00 |" in printed
    claims = {c["text"]: c for c in summary["claims"]}
    truncation = [t for t in claims if "truncation" in t]
    assert truncation == [
        "MRL [backbone.embed_dim=64] top-1 at least 20 points above truncation (of the standard "
        "[backbone.embed_dim=64] model) at its two smallest sizes "
        "(mrl [backbone.embed_dim=64] - slice [backbone.embed_dim=64] >= 20)",
        "MRL [backbone.embed_dim=null] top-1 at least 20 points above truncation (of the standard "
        "[backbone.embed_dim=null] model) at its two smallest sizes "
        "(mrl [backbone.embed_dim=null] - slice [backbone.embed_dim=null] >= 20)",
    ]
    # 60 - 45 misses by 5 at d=1 (no spread over the seeds: beyond their noise); 30 - 10 holds at d=1
    assert (
        claims[truncation[0]]["holds"] is False
        and "d=1: +15.00, d=2: +30.00" in claims[truncation[0]]["detail"]
    )
    assert "misses the bound by more than the seeds' noise" in claims[truncation[0]]["noise"]
    assert claims[truncation[1]]["holds"] is True and "d=1: +20.00" in claims[truncation[1]]["detail"]
    svd = [t for t in claims if "PCA/SVD (of the standard [backbone.embed_dim=null] model)" in t]
    assert len(svd) == 1 and "d=1: +15.00, d=2: +10.00" in claims[svd[0]]["detail"]


def test_jobs_of_two_recipes_are_told_apart_by_what_the_recipes_set(tmp_path):
    """A folder with a fashion_mnist_seeds sweep (the recipe sets backbone.embed_dim: 64) and a
    fashion_mnist_relu_baselines sweep (which sweeps backbone.embed_dim=64,null): rows are named by the
    setting that differs, not by the recipe, and the 64-d MRL of both recipes is one row. A job's own
    paths, settings following the seed, and incidental keys (tags, evaluate) differ too, and split nothing."""

    def job(sweep: str, name: str, recipe: str, head: dict, seed: int, embed_dim, *overrides: str) -> Path:
        out = str(tmp_path / sweep / name)
        config = {
            "backbone": {"name": "test_byobnet", "embed_dim": embed_dim},
            "data": {"seed": seed, "batch_size": 256},
            "trainer": {"max_epochs": 4, "default_root_dir": out},
            "callbacks": {"model_checkpoint": {"dirpath": out + "/checkpoints"}},
            "paths": {"output_dir": out},
            "tags": [recipe],
            "evaluate": None if recipe == "seeds" else {"methods": {"baselines": True}},
        }
        return _job(Path(out), head, seed, _top1({1: 0.5}), (f"experiment={recipe}", *overrides), **config)

    seeds = [job("a", f"{s}", "seeds", {"kind": "mrl"}, s, 64) for s in (0, 1)]
    seeds.append(job("a", "2", "seeds", {"kind": "ff", "dim": 1}, 0, 64))
    relu = [
        job("b", f"{e}{s}", "relu", {"kind": "mrl"}, s, e, f"backbone.embed_dim={'null' if e is None else e}")
        for e in (64, None)
        for s in (0, 1)
    ]
    labels = variant_labels([*seeds, *relu])
    assert [labels[j] for j in seeds] == ["backbone.embed_dim=64"] * 3
    assert [labels[j] for j in relu] == ["backbone.embed_dim=64"] * 2 + ["backbone.embed_dim=null"] * 2
    top1 = aggregate(collect(tmp_path))["top1"]
    assert top1["mrl [backbone.embed_dim=64]"][1].n == 4  # both recipes' 64-d MRL jobs, seeds 0, 1 twice
    assert set(top1) == {
        "mrl [backbone.embed_dim=64]",
        "mrl [backbone.embed_dim=null]",
        "ff [backbone.embed_dim=64]",
    }
    # one recipe alone: its settings are the same for every job, so no variant at all
    assert set(variant_labels(seeds).values()) == {""}
    # a recipe changing a setting that matters (the epochs) is its own row, named by that setting
    longer = job("c", "0", "longer", {"kind": "mrl"}, 0, 64)
    config = yaml.safe_load((longer / "resolved_config.yaml").read_text())
    config["trainer"]["max_epochs"] = 8
    (longer / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    labels = variant_labels([*seeds, longer])
    assert labels[longer] == "trainer.max_epochs=8" and labels[seeds[0]] == "trainer.max_epochs=4"


def test_heads_on_a_frozen_source_are_methods_of_their_own_named_by_the_source(tmp_path, capsys):
    """experiments/fashion_mnist_posthoc.yaml: a standard source with its baselines, end-to-end MRL, and
    heads (mrl, csr) on the source's features trained for fewer epochs. Post-hoc MRL is never averaged
    with end-to-end MRL; the epochs that differ only between the two kinds of training name no variant;
    post-hoc MRL's claims compare it with the source's own SVD."""
    root = tmp_path / "posthoc"
    source = root / "standard"
    _job(source, {"kind": "standard"}, 0, _top1({256: 0.91}), ("head=standard",))
    baselines = {"svd": {"1": 0.40, "2": 0.60}, "slice": {"1": 0.20, "2": 0.30}}
    _evaluate(source, _report({256: 0.88}, baselines), "evaluate")
    checkpoint = str(source / "checkpoints" / "epoch005.ckpt")
    for seed in (0, 1):
        e2e_top1 = _top1({1: 0.50, 2: 0.80})
        _job(root / "e2e" / str(seed), {"kind": "mrl"}, seed, e2e_top1, ("head=mrl",), source=None)
        for i, (kind, top1) in enumerate((("mrl", 0.45), ("csr", 0.70))):
            _job(
                root / "heads" / f"{seed}{i}",
                {"kind": kind},
                seed,
                _top1({1: top1, 2: top1 + 0.1}),
                (f"head={kind}", f"source={checkpoint}", "experiment=fashion_mnist_posthoc"),
                source=checkpoint,
                trainer={"max_epochs": 2},
            )
    labels = variant_labels(sorted(p.parent for p in root.rglob("resolved_config.yaml")))
    assert labels[source] == "" and labels[root / "e2e" / "0"] == ""
    assert labels[root / "heads" / "01"] == "source=standard"
    _, summary = _reported(root, capsys)
    top1 = summary["tables"]["top1"]
    assert set(top1) == {"mrl", "standard", "svd", "slice", "mrl [source=standard]", "csr [source=standard]"}
    assert top1["mrl"]["1"]["mean"] == pytest.approx(50.0) and top1["mrl"]["1"]["n"] == 2
    assert top1["mrl [source=standard]"]["1"]["mean"] == pytest.approx(45.0)
    assert top1["csr [source=standard]"]["2"]["mean"] == pytest.approx(80.0)
    claims = {c["text"]: c for c in summary["claims"]}
    (svd,) = [t for t in claims if t.startswith("MRL [source=standard]") and "PCA/SVD" in t]
    assert "(mrl [source=standard] - svd > 0)" in svd and "d=1: +5.00, d=2: -5.00" in claims[svd]["detail"]
    # two sources whose runs share a directory name are told apart by their paths
    other = str(tmp_path / "elsewhere" / "standard" / "checkpoints" / "epoch005.ckpt")
    twin = _job(tmp_path / "twin", {"kind": "csr"}, 0, _top1({1: 0.7}), (f"source={other}",), source=other)
    head = root / "heads" / "01"
    both = variant_labels([head, twin])
    assert both == {head: f"source={checkpoint}", twin: f"source={other}"}


def test_wandb_records_from_train_and_eval_runs():
    train = run_records(
        {"head": {"kind": "mrl"}, "seed": 1}, {"test/acc@8": 0.9, "test/acc@16": 0.95}, "train", "r"
    )
    assert {(r.method, r.size, r.metric, r.value, r.seed) for r in train} == {
        ("mrl", 8, "top1", 0.9, 1),
        ("mrl", 16, "top1", 0.95, 1),
    }
    ev = run_records(
        {"train": {"head": {"kind": "standard"}, "seed": 0}},
        {"eval/knn/1nn@64": 0.8, "eval/baselines/svd@2": 0.5, "eval/baselines/slice_1nn@2": 0.3},
        "eval",
        "e",
    )
    assert {(r.method, r.size, r.metric) for r in ev} == {
        ("standard", 64, "1nn"),
        ("svd", 2, "top1"),
        ("slice", 2, "1nn"),
    }


def test_wandb_source_counts_one_evaluation_per_training_run_and_keeps_val_apart():
    from mrl.compare.wandb_source import newest_evaluations

    def eval_run(run_id: str, created: str, one_nn: float) -> dict:
        config = {"train": {"head": {"kind": "mrl"}, "seed": 0, "logger": {"wandb": {"id": run_id}}}}
        return {
            "config": config,
            "summary": {"eval/knn/1nn@4": one_nn},
            "job_type": "eval",
            "name": f"eval:{run_id}",
            "created_at": created,
        }

    runs = [
        {"config": {}, "summary": {}, "job_type": "train", "name": "a", "created_at": "2026-01-01T00:00:00"},
        eval_run("a", "2026-01-02T00:00:00", 0.5),
        eval_run("a", "2026-01-03T00:00:00", 0.7),  # the same run evaluated again: replaces, not a seed
        eval_run("b", "2026-01-01T00:00:00", 0.9),
    ]
    kept = newest_evaluations(runs)
    assert sorted(r["summary"].get("eval/knn/1nn@4", 0) for r in kept) == [0, 0.7, 0.9]
    val_only = run_records({"head": {"kind": "mrl"}}, {"val/acc@4": 0.8}, "train", "v")
    assert [(r.metric, r.size) for r in val_only] == [("val_top1", 4)]


@pytest.mark.slow
def test_report_of_a_three_job_sweep(run_cli, tmp_path):
    """A 3-job multirun (MRL, FF at d=4, standard) evaluated after training, then mrl-report on it."""
    res = run_cli(
        "mrl-train",
        "-m",
        *TINY,
        "head={kind:mrl},{kind:ff,dim:4},{kind:standard}",
        CHEAP_EVAL,
        timeout=900,
    )
    assert res.returncode == 0, res.output[-3000:]
    jobs = res.sweep_job_dirs()
    assert len(jobs) == 3 and all(len(find_evaluations(j)) == 1 for j in jobs)
    sweep = jobs[0].parent
    rep = run_cli("mrl-report", str(sweep))
    assert rep.returncode == 0, rep.output[-3000:]
    out = sweep / "report"
    data = json.loads((out / "comparison.json").read_text())["tables"]
    mrl_results, ff_results, std_results = (read_results(j) for j in jobs)
    for d in (1, 8, 256):
        assert data["top1"]["mrl"][str(d)]["mean"] == pytest.approx(100 * mrl_results[f"test/acc@{d}"])
    assert set(data["top1"]["ff"]) == {"4"}
    assert data["top1"]["ff"]["4"]["mean"] == pytest.approx(100 * ff_results["test/acc@4"])
    assert data["top1"]["standard"]["256"]["mean"] == pytest.approx(100 * std_results["test/acc@256"])
    std_report = json.loads(find_evaluations(jobs[2])[0].read_text())
    for name in ("svd", "slice"):
        for d in ("1", "2", "4", "8"):
            assert data["top1"][name][d]["mean"] == pytest.approx(100 * std_report["baselines"][name][d])
            assert data["1nn"][name][d]["mean"] == pytest.approx(
                100 * std_report["baselines"][f"{name}_1nn"][d]
            )
    mrl_report = json.loads(find_evaluations(jobs[0])[0].read_text())
    assert data["map@10"]["mrl"]["16"]["mean"] == pytest.approx(100 * mrl_report["retrieval"]["16"]["map@10"])
    md = (out / "comparison.md").read_text()
    assert f"| mrl | {100 * mrl_results['test/acc@1']:.2f} |" in md
    claims = json.loads((out / "comparison.json").read_text())["claims"]
    assert "Claims:" in md and claims
    for claim in claims:  # a verdict comes from measured differences, never from missing numbers
        assert (claim["holds"] is None) == ("d=" not in claim["detail"].split("not measured")[0]), claim
    assert "**Jobs** (3)" in md and "- no evaluation found" not in md
    for job in jobs:
        where = find_evaluations(job)[0].relative_to(sweep)
        assert f"| {job.name} | " in md and f" | 1 | {where} | " in md
    assert (out / "comparison.png").stat().st_size > 10_000
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_inspect(runs[0])[0]["summary"]
    assert summary["report/top1/mrl@1"] == pytest.approx(100 * mrl_results["test/acc@1"])
    assert summary["report/top1/svd@2"] == pytest.approx(100 * std_report["baselines"]["svd"]["2"])
    for table in ("report/top1", "report/1nn", "report/map@10", "report/claims", "report/comparison_png"):
        assert table in summary, sorted(summary)
    # quality against bytes: each evaluation's quantized rows at the bytes its report.json gives
    by_bytes = json.loads((out / "comparison.json").read_text())["quality_vs_bytes"]
    for fmt in ("float32", "int8", "binary"):
        stored = mrl_report["bytes"]["embedding"][fmt]["16"]
        cell = by_bytes["tables"]["map@10"][f"mrl ({fmt})"][str(stored)]
        assert cell["mean"] == pytest.approx(100 * mrl_report["quantized"][fmt]["16"]["map@10"])
    assert std_report["bytes"]["svd"]["float32"]["4"] == 16
    assert by_bytes["tables"]["1nn"]["svd (float32)"]["16"]["mean"] == pytest.approx(
        100 * std_report["baselines"]["svd_1nn"]["4"]
    )
    assert by_bytes["best"] and "Best at each budget" in md
    assert (out / "quality_vs_bytes.png").stat().st_size > 10_000
    for key in ("report/quality_vs_bytes", "report/quality_vs_bytes_png", "report/best_at_budget"):
        assert key in summary, sorted(summary)


def test_report_bad_input(run_main, tmp_path):
    missing = run_main("mrl-report", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "is not a directory" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_main("mrl-report", str(empty))
    assert res.returncode == 1 and "No mrl-train jobs" in res.stderr and "Traceback" not in res.stderr
    neither = run_main("mrl-report")
    assert neither.returncode == 1 and "either a sweep directory or --wandb-group" in neither.stderr


def test_unknown_evaluate_key_is_a_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from mrl.errors import MRLError
    from mrl.eval.after_training import eval_config_after_training

    with pytest.raises(MRLError, match=r"conf/eval\.yaml"):
        eval_config_after_training(
            {"methods": {"linaer": True}}, Path("x.ckpt"), tmp_path, OmegaConf.create({})
        )


def test_a_switch_that_differs_between_seeds_is_not_mistaken_for_the_seed():
    """Jobs of seeds 0 and 1 with data.augment false / true: the switch is a setting of its own, not a
    value that follows the seed (False == 0 and True == 1 in Python)."""
    from mrl.compare.collect import recipe_settings

    configs = {
        Path(f"/s/{seed}"): {"seed": seed, "data": {"augment": bool(seed), "seed": seed}} for seed in (0, 1)
    }
    settings = recipe_settings(configs)
    assert set(settings[Path("/s/0")]) == {"data.augment"}
    assert settings[Path("/s/0")]["data.augment"] != settings[Path("/s/1")]["data.augment"]


def _evaluated(
    job: Path, query_split: str, one_nn: dict[int, float], mtime: float, ckpt_id: str = "c0", **settings
) -> Path:
    """A report.json as mrl-eval writes it now (its ``evaluated`` section and checkpoint record) in a
    place of its own under ``job/eval``, written at ``mtime``."""
    import os

    from mrl.eval import locations

    ckpt = job / "checkpoints" / "last.ckpt"
    evaluated = {"database_split": "train", "query_split": query_split, "sizes": None, "data": {}}
    evaluated |= {"embedding_dtype": "float32", "paper_head": None, **settings}
    record = locations.checkpoint_record(ckpt, ckpt_id, evaluated)
    out = locations.after_training_dir(job, ckpt, ckpt_id, record["evaluated"]["key"])
    out.mkdir(parents=True)
    splits = {"database_split": "train", "query_split": query_split}
    report = {**_report(one_nn), "evaluated": {**splits, "exclude_self": False}, "checkpoint": record}
    (out / "report.json").write_text(json.dumps(report))
    os.utime(out / "report.json", (mtime, mtime))
    return out / "report.json"


def test_the_report_compares_evaluations_of_one_split_and_names_it(tmp_path, capsys):
    """Job 0 was evaluated on test, then on val (its newest); job 1 on test; job 2 on val only; job 3
    on test at all sizes, then again at one size. The 1-NN table holds the four test evaluations' numbers
    (job 3's sizes from both of its evaluations), says what they were measured on, and lists the jobs
    whose evaluations on other splits were left out."""
    from mrl.compare.collect import collect_jobs

    sweep = tmp_path / "sweep"
    jobs = [_job(sweep / str(i), {"kind": "mrl"}, i, _top1({4: 0.9, 8: 0.95})) for i in range(4)]
    _evaluated(jobs[0], "test", {4: 0.80, 8: 0.85}, mtime=1_000_000)
    _evaluated(jobs[0], "val", {4: 0.40, 8: 0.45}, mtime=2_000_000)
    _evaluated(jobs[1], "test", {4: 0.84, 8: 0.89}, mtime=1_000_000)
    _evaluated(jobs[2], "val", {4: 0.30, 8: 0.35}, mtime=1_000_000)
    _evaluated(jobs[3], "test", {4: 0.70, 8: 0.75}, mtime=1_000_000)
    _evaluated(jobs[3], "test", {8: 0.76}, mtime=2_000_000, sizes=[8])
    records, infos = collect_jobs(sweep)
    tables = aggregate(records)
    assert tables["1nn"]["mrl"][4].values == pytest.approx((80.0, 84.0, 70.0))
    assert tables["1nn"]["mrl"][8].values == pytest.approx((85.0, 89.0, 76.0))
    assert tables["map@10"]["mrl"][4].values == pytest.approx((70.0, 74.0, 60.0))
    assert [(i.other_settings, i.evaluated) for i in infos] == [
        (1, "test queries, train database"),
        (0, "test queries, train database"),
        (1, None),
        (0, "test queries, train database"),
    ]
    printed, _ = _reported(sweep, capsys)
    assert "**Top-1 accuracy (%)** on test split," in printed
    assert "**1-NN accuracy (%)** on test queries, train database," in printed
    assert "**mAP@10 (%)** on test queries, train database," in printed
    assert "- evaluated only on other splits or data, so no 1-NN, mAP@10 or baselines compared: 2" in printed
    assert "- evaluations on other splits or data left out: 0" in printed


def test_a_split_searched_by_itself_is_marked(tmp_path, capsys):
    """Every job evaluated with query_split=train only: compared with each other, and said so."""
    sweep = tmp_path / "sweep"
    for i in range(2):
        job = _job(sweep / str(i), {"kind": "mrl"}, i, _top1({4: 0.9}))
        _evaluated(job, "train", {4: 0.9 + i / 100}, mtime=1_000_000)
    printed, summary = _reported(sweep, capsys)
    title = (
        "**1-NN accuracy (%)** on train queries, train database (each query left out of its own neighbours),"
    )
    assert title in printed
    assert summary["tables"]["1nn"]["mrl"]["4"]["values"] == pytest.approx([90.0, 91.0])


def test_wandb_source_compares_evaluation_runs_of_one_split():
    """Run a's newest evaluation run is on val, b's and a's older one on test: the test ones count."""
    from mrl.compare.wandb_source import newest_evaluations

    def eval_run(run_id: str, created: str, one_nn: float, query_split: str) -> dict:
        train = {"head": {"kind": "mrl"}, "seed": 0, "logger": {"wandb": {"id": run_id}}}
        settings = {"database_split": "train", "query_split": query_split, "data": {}}
        return {
            "config": {"train": train, "eval": settings},
            "summary": {"eval/knn/1nn@4": one_nn},
            "job_type": "eval",
            "name": f"eval:{run_id}",
            "created_at": created,
        }

    runs = [
        eval_run("a", "2026-01-02T00:00:00", 0.5, "test"),
        eval_run("a", "2026-01-03T00:00:00", 0.2, "val"),
        eval_run("b", "2026-01-01T00:00:00", 0.9, "test"),
    ]
    kept = newest_evaluations(runs)
    assert sorted(r["summary"]["eval/knn/1nn@4"] for r in kept) == [0.5, 0.9]
    (record,) = run_records(kept[0]["config"], kept[0]["summary"], "eval", "e")
    assert record.split == "test queries, train database"


def test_row_names_hold_only_settings_the_rows_have_and_each_claim_is_stated_once(tmp_path):
    """A setting of some jobs' objective (absent from the others' config) names only their rows: no
    ``mrl [objective.temperature=default]``; a claim no row can be checked on is one line, not one per
    MRL row."""
    supcon = {"kind": "supcon", "temperature": 0.1}
    for s in (0, 1):
        _job(tmp_path / f"ce{s}", {"kind": "mrl"}, s, _top1({4: 0.5}), (), objective={"kind": "ce"})
        for t in (0.1, 0.5):
            _job(
                tmp_path / f"sc{t}{s}",
                {"kind": "mrl"},
                s,
                _top1({4: 0.6}),
                ("objective=supcon", f"objective.temperature={t}"),
                objective={**supcon, "temperature": t},
            )
    top1 = aggregate(collect(tmp_path))["top1"]
    assert set(top1) == {
        "mrl",
        "mrl+supcon [objective.temperature=0.1]",
        "mrl+supcon [objective.temperature=0.5]",
    }
    rows = {f"mrl [w={w}]": {4: Cell(50.0, 0.0, 2, (50.0, 50.0))} for w in (1, 2)}
    claims = check_claims({"top1": rows})
    below_ff = [c.text for c in claims if "below FF" in c.text]
    assert below_ff == ["MRL top-1 at most 1 point below FF at each size (mrl - ff >= -1)"]
