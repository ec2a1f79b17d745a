"""Where mrl-eval writes: one place per checkpoint content *and* what was evaluated of it (splits, sizes,
data, dtype), so an evaluation with other settings never replaces another's report, plots or embeddings;
checkpoint.json and report.json say the same; a split searched by itself leaves each query out of its
own neighbours. In-process on one tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.eval import locations
from mrl.eval.locations import checkpoint_id, evaluation_settings, find_evaluations, standalone_dir_name
from mrl.resolvers import evaluation_key, register_resolvers
from support import TINY, call_main

QUICK = (
    "logger=none",
    "threads=1",
    "export_model=false",
    "methods.adaptive_classification=false",
    "methods.adaptive_retrieval=false",
    "methods.baselines=false",
    "quantized.formats=[int8]",
)


class _Printed:
    """``capfd`` for a module fixture: what the command prints is left to pytest's own capture."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """One tiny MRL run (sizes 2, 4, 8, 16; 128 train, 64 val and 64 test images); its last checkpoint."""
    tmp = tmp_path_factory.mktemp("run")
    args = (*TINY, "logger=none", "head.nesting=[2,4,8,16]", "backbone.embed_dim=16")
    result = call_main("mrl-train", *args, cwd=tmp, capture=_Printed())
    assert result.returncode == 0
    (path,) = (tmp / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    return path


def _files(directory: Path) -> dict[Path, bytes]:
    """Every result file under ``directory`` (Hydra's own config and log excepted) with its bytes."""
    return {
        p: p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_a_split_searched_by_itself_leaves_each_query_out(run_main, ckpt):
    """query_split=train with the train database: 1-NN is the nearest *other* item's label (the old
    evaluation found each query itself: 100%), recomputed here from the exported embeddings."""
    result = run_main("mrl-eval", f"ckpt_path={ckpt}", "query_split=train", "retrieval.ks=[10]", *QUICK)
    assert result.returncode == 0, result.output[-3000:]
    (out,) = result.run_dirs("eval")
    report = json.loads((out / "report.json").read_text())
    z, y = np.load(out / "train_embeddings.npy"), np.load(out / "train_labels.npy")
    for d in (2, 4, 8, 16):
        p = z[:, :d] / np.linalg.norm(z[:, :d], axis=1, keepdims=True)
        scores = p.astype(np.float64) @ p.T.astype(np.float64)
        np.fill_diagonal(scores, -np.inf)  # the query itself
        # A query whose best items score within float32 rounding of each other (at d=2, 128 points on a
        # circle, a few do) may get any of them from the float32 search: right if all are of its label,
        # wrong if none is, either way otherwise
        tied = scores >= scores.max(axis=1, keepdims=True) - 1e-6
        same_label = y[None, :] == y[:, None]
        surely_right = np.all(same_label | ~tied, axis=1)
        maybe_right = np.any(same_label & tied, axis=1)
        # the bounds stay tight: few queries are that close to a tie
        assert np.sum(maybe_right != surely_right) <= len(y) // 8
        assert surely_right.mean() - 1e-9 <= report["knn"][str(d)]["1nn"] <= maybe_right.mean() + 1e-9, d
        assert report["quantized"]["float32"][str(d)]["1nn"] == report["knn"][str(d)]["1nn"]
    assert report["knn"]["16"]["1nn"] < 1.0
    assert report["evaluated"] == {
        "database_split": "train",
        "query_split": "train",
        "database_items": 128,
        "query_items": 128,
        "exclude_self": True,
    }
    assert "128 train queries, 128 train database items, each query left out of its own" in result.stdout


def test_evaluations_with_other_settings_keep_their_own_places(run_main, ckpt, tmp_path):
    """The default evaluation, then one on the val split, one of two sizes and one on other data: four
    places, the first one's files untouched, each report naming what it evaluated; the run finds all."""
    first = run_main("mrl-eval", f"ckpt_path={ckpt}", *QUICK)
    assert first.returncode == 0, first.output[-3000:]
    (default,) = first.run_dirs("eval")
    before = _files(default)
    for args in (["query_split=val"], ["sizes=[16,4]"], ["+data.noise=2.0"]):
        result = run_main("mrl-eval", f"ckpt_path={ckpt}", *QUICK, *args)
        assert result.returncode == 0, result.output[-3000:]
    places = result.run_dirs("eval")
    assert len(places) == 4 and default in places
    assert _files(default) == before  # not replaced: report, plots, embeddings, checkpoint.json
    reports = {p.name: json.loads((p / "report.json").read_text()) for p in places}
    assert sorted(r["evaluated"]["query_split"] for r in reports.values()) == ["test", "test", "test", "val"]
    assert sorted(r["sizes"] for r in reports.values()) == [[2, 4, 8, 16]] * 3 + [[4, 16]]
    for place in places:
        report = reports[place.name]
        assert place.name.endswith("_" + report["checkpoint"]["evaluated"]["key"])
        assert json.loads((place / "checkpoint.json").read_text()) == report["checkpoint"]
    # the training run links to each of them (other tests' evaluations of it too)
    assert {p.parent for p in find_evaluations(ckpt.parent.parent)} >= {p.resolve() for p in places}

    # pointing one evaluation at another's place is refused, its results left as they are
    refused = run_main("mrl-eval", f"ckpt_path={ckpt}", f"hydra.run.dir={default}", "query_split=val", *QUICK)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "holds an evaluation of this checkpoint with other settings" in refused.stderr
    assert 'query_split="val" (there: "test")' in refused.stderr
    assert _files(default) == before


def test_two_paths_to_one_checkpoint_agree_in_checkpoint_json_and_the_report(run_main, ckpt, tmp_path):
    """A copy of the run under another folder (same run name, same content): the same place, whose
    checkpoint.json and report.json name the path evaluated last, and the embeddings are reused."""
    copy = tmp_path / "elsewhere" / ckpt.parents[1].name
    shutil.copytree(ckpt.parents[1], copy)
    other = copy / "checkpoints" / "last.ckpt"
    for path in (ckpt, other):
        result = run_main("mrl-eval", f"ckpt_path={path}", *QUICK)
        assert result.returncode == 0, result.output[-3000:]
    (out,) = result.run_dirs("eval")
    record = json.loads((out / "checkpoint.json").read_text())
    assert record == json.loads((out / "report.json").read_text())["checkpoint"]
    assert record["path"] == str(other.absolute())
    assert "Reusing" in result.output  # the same content: the same embeddings


def test_the_output_dir_of_mrl_eval_is_keyed_by_what_it_evaluates(tmp_path, monkeypatch):
    """conf/eval.yaml's hydra.run.dir and mrl.eval.locations give the same name; it changes with the
    splits, sizes, data (a relative data path from another folder too) and dtype, not with the methods."""
    from mrl.cli.eval import eval_dir_name

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    register_resolvers()
    if not OmegaConf.has_resolver("mrl_eval_name"):
        OmegaConf.register_new_resolver("mrl_eval_name", eval_dir_name)

    def name(*overrides: str) -> str:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", *overrides], return_hydra_config=True)
        run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
        key = evaluation_key(evaluation_settings(cfg))
        assert run_dir.name == standalone_dir_name(ckpt, checkpoint_id(ckpt), key)
        return run_dir.name

    (tmp_path / "a" / "shards").mkdir(parents=True)
    (tmp_path / "b" / "shards").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    default = name()
    assert default.startswith(f"run_last-{checkpoint_id(ckpt)}_train-test-")
    assert name("methods.baselines=false", "knn.k=3") == default
    assert name("sizes=[8,2]") == name("sizes=[2,8]") != default
    variants = {
        name("query_split=val"),
        name("database_split=val"),
        name("sizes=[2,8]"),
        name("embedding_dtype=float16"),
        name("+data.input_dir=shards"),
        default,
    }
    assert len(variants) == 6
    monkeypatch.chdir(tmp_path / "b")
    assert name("+data.input_dir=shards") not in variants  # another folder's shards


def test_a_directory_of_other_settings_is_refused(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"weights")
    base = {"database_split": "train", "query_split": "test", "sizes": None, "data": {}}
    settings = {**base, "embedding_dtype": "float32", "paper_head": None}
    record = locations.checkpoint_record(ckpt, "abc", settings)
    locations.claim_output_dir(tmp_path / "out", record)
    locations.claim_output_dir(tmp_path / "out", record)  # the same evaluation again: its own place
    other = locations.checkpoint_record(ckpt, "abc", {**settings, "sizes": [8]})
    with pytest.raises(MRLError, match=r"other settings \(sizes=\[8\] \(there: null\)\)"):
        locations.claim_output_dir(tmp_path / "out", other)
