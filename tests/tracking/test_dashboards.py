"""W&B dashboards as code: the project workspace (mrl-dashboard) and the sweep report (mrl-report
--wandb-report), built with wandb-workspaces and, offline, written as the spec they would save.

The fast tests build the specs from given keys; the slow ones run a real sweep with W&B offline and
check the written specs against what the runs logged, read back with `wandb leet inspect --json`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mrl.errors import MRLError
from mrl.tracking.dashboards.curves import curves_of
from mrl.tracking.dashboards.keys import LoggedRun, leet_inspect, parse_records, sizes
from mrl.tracking.dashboards.report import SweepReport, sweep_report
from mrl.tracking.dashboards.spec import document, dump, from_document, offline_reason, panel_keys
from mrl.tracking.dashboards.sweep import swept_keys
from mrl.tracking.dashboards.workspace import project_workspace
from support import BIN, TINY, command_env, wandb_inspect, wandb_records

SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
TEXT_ORDER = sorted(str(d) for d in SIZES)  # 1, 128, 16, 2, ...: what W&B's default panels show


def _panels(spec: dict) -> list[dict]:
    """Every panel of a dumped workspace or report (a dict with a ``viewType``), in order."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "viewType" in node:
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def _without_ids(node):
    """A dumped spec without the random ids the library gives each panel and runset."""
    if isinstance(node, dict):
        return {k: _without_ids(v) for k, v in node.items() if k not in ("__id__", "id")}
    if isinstance(node, list):
        return [_without_ids(v) for v in node]
    return node


def _size_order(metrics: list[str]) -> list[int]:
    return [int(m.rsplit("@", 1)[1].split(".")[0]) for m in metrics if "@" in m]


def _run(**keys) -> LoggedRun:
    return LoggedRun(project="p", job_type="train", **keys)


def _full_run() -> LoggedRun:
    history = {"epoch", "trainer/global_step", "train/loss", "val/loss", "train/lr"}
    for d in SIZES:
        history |= {f"{s}/acc@{d}" for s in ("train", "val", "test")}
        history |= {f"{s}/loss@{d}" for s in ("train", "val")} | {f"{s}/top5@{d}" for s in ("val", "test")}
    return _run(history=history, system={"system/gpu.0.gpu", "system/gpu.1.gpu", "system/proc.memory.rssMB"})


# ---------------------------------------------------------------- fast: the spec builders


def test_sizes_come_in_numeric_order():
    keys = {f"val/acc@{d}" for d in SIZES} | {"val/acc_vs_size", "val/acc@x", "train/acc@3"}
    assert sizes(keys, "val/acc") == SIZES


def test_records_of_an_offline_run_give_its_keys():
    records = [
        {"type": "run", "run": {"display_name": "r", "run_id": "i", "project": "p", "run_group": "g",
                                "job_type": "train", "config": {"update": {"_wandb": {}}}}},
        {"type": "config", "config": {"update": {"head": {"kind": "mrl"}, "seed": 0}}},
        {"type": "config", "config": {"update": {"_wandb.visualize.val/acc_vs_size_chart": {}}}},
        {"type": "history", "history": {"item": {"_step": 0, "epoch": 0, "val/acc@4": 0.5,
                                                 "val/acc_vs_size._type": "table-file",
                                                 "val/acc_vs_size.path": "x"}}},
        {"type": "summary", "summary": {"update": {"val/acc@4": {"max": 0.5, "last": 0.5},
                                                   "test/acc@4": 0.4}}},
        {"type": "stats", "stats": {"item": {"gpu.0.gpu": 10, "proc.memory.rssMB": 800}}},
    ]  # fmt: skip
    run = parse_records([json.dumps(r) for r in records] + [""], "dir")
    assert (run.project, run.group, run.job_type) == ("p", "g", "train")
    assert run.history == {"epoch", "val/acc@4"}
    assert run.media == {"val/acc_vs_size"}
    assert run.summary == {"val/acc@4.max", "val/acc@4.last", "test/acc@4"}
    assert run.system == {"system/gpu.0.gpu", "system/proc.memory.rssMB"}
    assert run.config == {"head": {"kind": "mrl"}, "seed": 0}


def test_workspace_sections_in_a_natural_order_sizes_in_numeric_order():
    run = _full_run()
    workspace = project_workspace([run], "p")
    assert [s.name for s in workspace.sections] == [
        "Top-1 accuracy per size",
        "Final accuracy vs embedding size",
        "Loss per size",
        "Top-5 accuracy per size",
        "Learning rate",
        "System",
    ]
    spec = dump(workspace)
    panels = _panels(spec)
    per_size = [p["config"]["metrics"] for p in panels if any("@" in m for m in p["config"]["metrics"])]
    assert len(per_size) == 7  # val/train top-1, final test top-1, val/train loss, val top-5, test top-5
    for metrics in per_size:
        assert _size_order(metrics) == SIZES, metrics
        assert [str(d) for d in _size_order(metrics)] != TEXT_ORDER
    val_top1 = panels[0]["config"]
    assert val_top1["metrics"] == [f"val/acc@{d}" for d in SIZES] and val_top1["xAxis"] == "epoch"
    lr = next(p["config"] for p in panels if p["config"]["metrics"] == ["train/lr"])
    assert lr["xAxis"] == "trainer/global_step"
    gpu = next(p["config"] for p in panels if "system/gpu.0.gpu" in p["config"]["metrics"])
    assert gpu["metrics"] == ["system/gpu.0.gpu", "system/gpu.1.gpu"]
    # W&B's automatic panels (one per key, text order) are off
    assert spec["spec"]["section"]["settings"]["shouldAutoGeneratePanels"] is False
    keys = panel_keys(spec)
    logged = run.history | run.system | {"_runtime"}  # W&B's process time, the system charts' x axis
    assert set(keys["history"]) <= logged


def test_workspace_names_only_logged_keys():
    run = _run(history={"epoch", "val/acc@2", "val/acc@1", "val/acc@10"})
    workspace = project_workspace([run], "p")
    assert [s.name for s in workspace.sections] == [
        "Top-1 accuracy per size",
        "Final accuracy vs embedding size",
    ]
    assert set(panel_keys(dump(workspace))["history"]) == run.history
    assert _size_order(_panels(dump(workspace))[0]["config"]["metrics"]) == [1, 2, 10]


def _report() -> SweepReport:
    return SweepReport(
        project="p",
        group="sweep-1",
        report_id="abcd1234",
        title="t",
        intro="intro",
        tables="| method | d=1 |\n|---|---:|\n| mrl | 50.00 |",
        claims="- claim: holds",
        jobs="jobs",
        curves=[("top1", "Top-1 accuracy (%)"), ("1nn", "1-NN accuracy (%)"), ("map@10", "mAP@10 (%)")],
        swept=["head.kind", "seed"],
        val_keys=[f"val/acc@{d}.max" for d in SIZES],
    )


def test_report_aggregates_seeds_per_method_on_a_log_size_axis():
    spec = dump(sweep_report(_report()))
    blocks = spec["spec"]["blocks"]
    grids = [b for b in blocks if b["type"] == "panel-grid"]
    curves, runs = grids
    (curve_runs,) = curves["metadata"]["runSets"]
    filters = {(f["key"]["name"], f["value"]) for f in curve_runs["filters"]["filters"]}
    assert filters == {("group", "sweep-1"), ("jobType", "size-curves"), ("report_id", "abcd1234")}
    assert curve_runs["grouping"] == [{"section": "config", "name": "method.value"}]
    charts = curves["metadata"]["panelBankSectionConfig"]["panels"]
    assert [c["config"]["metrics"] for c in charts] == [["by_size/top1"], ["by_size/1nn"], ["by_size/map@10"]]
    for chart in charts:
        config = chart["config"]
        assert config["xAxis"] == "size" and config["xLogScale"] is True
        assert (config["groupBy"], config["groupAgg"], config["groupArea"]) == (
            "method.value",
            "mean",
            "minmax",
        )
        assert config["aggregate"] is True
    parallel, comparer = runs["metadata"]["panelBankSectionConfig"]["panels"]
    assert parallel["viewType"] == "Parallel Coordinates Plot" and comparer["viewType"] == "Run Comparer"
    accessors = [c["accessor"] for c in parallel["config"]["columns"]]
    assert accessors == ["config:head.value.kind", "config:seed.value"] + [
        f"summary:val/acc@{d}.max" for d in SIZES
    ]
    text = json.dumps(blocks)
    assert "| mrl | 50.00 |" in text and "claim: holds" in text
    first_heading = next(b for b in blocks if b["type"] == "heading")
    assert first_heading["children"][0]["text"] == "Accuracy vs embedding size"


@pytest.mark.parametrize("build", ["workspace", "report"])
def test_a_spec_file_reads_back_to_the_same_object(build):
    """--from-spec rebuilds the object with the library's own loader: its serialisation is unchanged."""
    obj = project_workspace([_full_run()], "p") if build == "workspace" else sweep_report(_report())
    doc = json.loads(json.dumps(document(obj, "test")))
    assert doc["kind"] == build and doc["project"] == "p"
    assert dump(from_document(doc)) == doc["spec"]


def test_curves_one_per_method_and_seed_every_number_once():
    points = [("mrl", 0, "top1", 4, 0.5), ("mrl", 0, "top1", 16, 0.6), ("mrl", 1, "top1", 4, 0.7)]
    points += [("ff", 0, "top1", 4, 0.4), ("ff", 0, "top1", 16, 0.5), ("ff", 0, "1nn", 4, 0.3)]
    points += [("mrl", 0, "top1", 4, 0.55)]  # a repeated job: its own curve, still counted once
    curves = curves_of(points)
    assert [(c.method, c.seed, c.sizes()) for c in curves] == [
        ("mrl", 0, [4, 16]),
        ("mrl", 1, [4]),
        ("ff", 0, [4, 16]),
        ("mrl", 0, [4]),
    ]
    assert sum(len(v) for c in curves for v in c.values.values()) == len(points)


def test_swept_keys_are_the_varying_leaves_of_the_varied_overrides():
    def config(kind, seed, out):
        return {"head": {"kind": kind, "bias": True}, "seed": seed, "paths": {"output_dir": out}, "lr": 0.1}

    runs = [_run(config=config(k, s, f"/x/{i}")) for i, (k, s) in enumerate([("mrl", 0), ("mrl_e", 1)])]
    assert swept_keys(runs, ["head", "seed"], lambda k: True) == ["head.kind", "seed"]
    assert swept_keys(runs, None, lambda k: not k.startswith("paths")) == ["head.kind", "seed"]


def test_offline_is_decided_without_the_api(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert offline_reason() == "WANDB_MODE=offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert "no W&B credentials" in offline_reason()


def test_from_spec_offline_says_so(tmp_path, monkeypatch, capsys):
    from mrl.cli.dashboard import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document(project_workspace([_full_run()], "p"), "test")))
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_info:
        main(["--from-spec", str(path)])
    assert exit_info.value.code == 1
    assert "can only be saved online" in capsys.readouterr().err


def test_online_the_workspace_goes_to_the_api_call_and_its_url_is_printed(monkeypatch, tmp_path, capsys):
    """With credentials and a reachable server the same workspace reaches ``save`` (the API call, not
    made here) instead of a spec file; its URL is printed."""
    import mrl.cli.dashboard as cli
    import mrl.tracking.dashboards.spec as spec

    saved = []
    monkeypatch.setattr(spec, "offline_reason", lambda: None)
    monkeypatch.setattr(
        spec, "save", lambda obj, entity=None: saved.append(obj) or "https://wandb.ai/e/p?nw=x"
    )
    monkeypatch.setattr(cli, "_runs", lambda args, reason: [_full_run()])
    monkeypatch.chdir(tmp_path)
    cli.main(["--project", "p"])
    assert capsys.readouterr().out == "W&B workspace: https://wandb.ai/e/p?nw=x\n"
    assert [type(o).__name__ for o in saved] == ["Workspace"] and not list(tmp_path.iterdir())
    assert _without_ids(dump(saved[0])) == _without_ids(dump(project_workspace([_full_run()], "p")))


# ---------------------------------------------------------------- slow: a real sweep, W&B offline


def _cli(cmd: list[str], cwd: Path, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=command_env(log_dir), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """2 methods x 2 seeds at sizes 4, 16, 64 (the text order 16, 4, 64 differs), W&B offline."""
    root = tmp_path_factory.mktemp("dash")
    proc = _cli(
        [
            str(BIN / "mrl-train"),
            "-m",
            "head=mrl,mrl_e",
            "seed=0,1",
            "head.nesting=[4,16,64]",
            *TINY,
            "evaluate={methods: {adaptive_retrieval: false, adaptive_classification: false, "
            "baselines: false}}",
        ],
        root,
        root / "logs",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (root / "logs" / "train" / "multiruns").iterdir()
    return sweep_dir


def _logged(run_dir: Path) -> dict:
    """What one run logged, straight from its records: job type, config, history and system keys."""
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    stats = {f"system/{k}" for r in records if r["type"] == "stats" for k in r["stats"]["item"]}
    summary, _ = wandb_inspect(run_dir)
    return {
        "job_type": run["job_type"],
        "group": run["run_group"],
        "config": summary["config"],
        "summary": summary["summary"],
        "rows": history,
        "keys": {k for row in history for k in row} | stats,
    }


def _config_at(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.slow
def test_sweep_report_offline_writes_the_spec_of_logged_keys(sweep):
    proc = _cli(
        [str(BIN / "mrl-report"), str(sweep), "--wandb-report"], sweep.parent, sweep.parent.parent.parent
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec_path = sweep / "report" / "wandb_report.json"
    notice = [line for line in proc.stdout.splitlines() if line.startswith("W&B offline")]
    assert notice == [
        f"W&B offline (WANDB_MODE=offline): report not saved; its spec is in {spec_path} (after `wandb sync` "
        f"of the sweep's runs, online: mrl-dashboard --from-spec {spec_path})"
    ]
    doc = json.loads(spec_path.read_text())
    runs = [_logged(d) for d in sorted((sweep / "report" / "wandb").glob("offline-run-*"))]
    curves = [r for r in runs if r["job_type"] == "size-curves"]
    trained = [_logged(d) for d in sorted(sweep.glob("[0-9]*/wandb/offline-run-*"))]
    assert len(curves) == 4 and len(trained) == 4

    panels = _panels(doc["spec"])
    charts = [p["config"] for p in panels if p["viewType"] == "Run History Line Plot"]
    assert [c["metrics"] for c in charts] == [["by_size/top1"], ["by_size/1nn"], ["by_size/map@10"]]
    # 2 methods x 2 seeds: the curve runs the charts' runset selects carry 2 methods, 2 seeds each, and
    # every chart groups them by method (mean, min-max band): 2 aggregated lines per chart
    (runset,) = next(b for b in doc["spec"]["spec"]["blocks"] if b["type"] == "panel-grid")["metadata"][
        "runSets"
    ]
    wanted = {f["key"]["name"]: f["value"] for f in runset["filters"]["filters"]}
    selected = [
        r
        for r in curves
        if r["group"] == wanted["group"] and r["job_type"] == wanted["jobType"]
        and r["config"]["report_id"] == wanted["report_id"]
    ]  # fmt: skip
    assert sorted((r["config"]["method"], r["config"]["seed"]) for r in selected) == [
        ("mrl", 0), ("mrl", 1), ("mrl_e", 0), ("mrl_e", 1)
    ]  # fmt: skip
    for chart in charts:
        assert (chart["groupBy"], chart["groupAgg"], chart["groupArea"]) == ("method.value", "mean", "minmax")
        assert len({_config_at(r["config"], chart["groupBy"].replace(".value", "")) for r in selected}) == 2
        for r in selected:  # every curve run has the chart's keys, one row per size in numeric order
            assert {chart["xAxis"], *chart["metrics"]} <= r["keys"]
            assert [row["size"] for row in r["rows"] if "size" in row] == [4, 16, 64]
    # the curves hold the jobs' own numbers: their mean over seeds is the comparison table's mean
    table = json.loads((sweep / "report" / "comparison.json").read_text())["tables"]["top1"]
    for method in ("mrl", "mrl_e"):
        for d in (4, 16, 64):
            values = [row["by_size/top1"] for r in selected if r["config"]["method"] == method
                      for row in r["rows"] if row.get("size") == d]  # fmt: skip
            assert sum(values) / len(values) == pytest.approx(table[method][str(d)]["mean"])  # percent

    # the parallel coordinates name the swept settings and each size's best val accuracy, as logged
    (parallel,) = [p["config"] for p in panels if p["viewType"] == "Parallel Coordinates Plot"]
    accessors = [c["accessor"] for c in parallel["columns"]]
    assert accessors == ["config:head.value.kind", "config:seed.value"] + [
        f"summary:val/acc@{d}.max" for d in (4, 16, 64)
    ]
    swept = [a.removeprefix("config:").replace(".value", "") for a in accessors if a.startswith("config:")]
    for key, values in zip(swept, ({"mrl", "mrl_e"}, {0, 1}), strict=True):  # as the training runs hold them
        assert {_config_at(run["config"], key) for run in trained} == values
    for run in trained:
        assert run["job_type"] == "train" and run["group"] == sweep.name
        for d in (4, 16, 64):
            assert "max" in run["summary"][f"val/acc@{d}"]
    assert doc["keys"]["summary"] == [f"val/acc@{d}.max" for d in (4, 16, 64)]
    assert any(p["viewType"] == "Run Comparer" for p in panels)
    text = json.dumps(doc["spec"])
    assert "Top-1 accuracy (%)" in text and "MRL-E top-1 at most 2 points below MRL" in text


@pytest.mark.slow
def test_dashboard_offline_writes_the_workspace_spec_of_logged_keys(sweep, tmp_path):
    logs = sweep.parent.parent.parent
    proc = _cli(
        [sys.executable, "-m", "mrl.cli.dashboard", "--project", "mrl", "--runs", str(logs)], tmp_path, logs
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec_path = Path("wandb_workspace_mrl.json")
    assert proc.stdout.splitlines() == [
        f"W&B offline (WANDB_MODE=offline): workspace not saved; its spec is in {spec_path} "
        f"(after `wandb sync` of the runs, online: mrl-dashboard --from-spec {spec_path})"
    ]
    doc = json.loads((tmp_path / spec_path).read_text())
    assert doc["kind"] == "workspace" and doc["project"] == "mrl"
    logged = set()
    for run_dir in logs.rglob("offline-run-*"):
        logged |= _logged(run_dir)["keys"]
    panels = _panels(doc["spec"])
    named = {m for p in panels for m in p["config"]["metrics"]} | {p["config"].get("xAxis") for p in panels}
    assert named - {None} <= logged, sorted(named - logged)
    per_size = [p["config"]["metrics"] for p in panels if any("@" in m for m in p["config"]["metrics"])]
    assert per_size and all(_size_order(m) == [4, 16, 64] for m in per_size)
    assert "val/acc@4" in doc["keys"]["history"] and "train/lr" in doc["keys"]["history"]


@pytest.mark.slow
def test_leet_inspect_is_what_wandb_prints(sweep, tmp_path):
    """mrl reads runs with W&B's reader binary directly: byte for byte what `wandb leet inspect` prints."""
    run_dir = next(sweep.glob("0/wandb/offline-run-*"))
    for flags in (["--json"], ["--summary", "--json"]):
        script = subprocess.run(
            [str(BIN / "wandb"), "leet", "inspect", *flags, str(run_dir)], capture_output=True, text=True
        )
        assert script.returncode == 0 and script.stdout.strip(), script.stderr
        assert leet_inspect(run_dir, *flags) == script.stdout
    with pytest.raises(MRLError, match="Cannot read the W&B run"):  # no log: the script's own refusal
        leet_inspect(tmp_path)
