"""Evaluation as one loop: the neighbours of each size are searched once and shared through the context
(kNN, retrieval, the baselines' 1-NN and the quantised float32 rows), and the robustness sets are an
evaluator of the registry like the others (checked, opened and run by the loop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torchvision.datasets import ImageFolder

from mrl.config_path import config_dir
from mrl.errors import MRLError
from mrl.eval import context, evaluators
from mrl.eval.checks import check_eval_config
from mrl.eval.context import EmbeddedSet, EvalContext, QuerySet
from mrl.eval.knn import exact_search
from mrl.eval.linear import linear_accuracy
from mrl.eval.robustness import RobustnessSet
from support import tiny_eval_context as _context

SIZES = [2, 4, 8, 16]


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unset", *overrides])


@pytest.fixture
def searches(monkeypatch) -> list[tuple[tuple[int, ...], int]]:
    """The (sizes, k) of each exact search the context runs (each still runs)."""
    calls: list[tuple[tuple[int, ...], int]] = []
    real = context.search_all_sizes

    def spy(database, queries, sizes, k, *args, **kwargs):
        calls.append((tuple(sizes), k))
        return real(database, queries, sizes, k, *args, **kwargs)

    monkeypatch.setattr(context, "search_all_sizes", spy)
    return calls


def test_neighbours_are_searched_once_for_every_size_and_deepened_only_when_asked(searches):
    ctx = _context(_compose("chunks.database=37", "search=one_pass"))  # several database chunks
    first = ctx.neighbours(4, 10)
    # one pass gave every reported size's neighbours
    assert first.shape == (40, 10) and searches == [(tuple(SIZES), 10)]
    np.testing.assert_array_equal(ctx.neighbours(4, 10), first)
    np.testing.assert_array_equal(ctx.neighbours(4, 1), first[:, :1])  # a shallower ask: the same search
    assert ctx.neighbours(16, 10).shape == (40, 10) and len(searches) == 1  # another size: the same pass
    deeper = ctx.neighbours(4, 30)  # deeper than kept: searched again, and kept instead
    assert deeper.shape == (40, 30) and searches[1:] == [(tuple(SIZES), 30)]
    np.testing.assert_array_equal(ctx.neighbours(8, 20), ctx.neighbours(8, 30)[:, :20])
    assert len(searches) == 2
    direct = exact_search(ctx.database, ctx.queries, 4, 30, 4096, 37, False)[1]
    np.testing.assert_array_equal(deeper, direct)  # faiss's per-size search: the same neighbours
    ctx.neighbours(3, 5)  # a size outside the reported ones: searched alone
    assert searches[2:] == [((3,), 5)]


@pytest.mark.parametrize("kind", ["mrl", "standard"])
def test_one_evaluation_searches_each_size_once(searches, kind):
    """Every evaluator that ranks by a size's neighbours (kNN, retrieval, the baselines' 1-NN, the
    quantised float32 rows) shares one search: every reported size from one pass, each untrained slice
    size alone."""
    overrides = ("baselines.knn=true", "baselines.svd=false", "baselines.max_iter=20")
    cfg = _compose(*overrides, "methods.adaptive_retrieval=false", "search=one_pass")
    ctx = _context(cfg, kind)
    sections = evaluators.run_evaluators(ctx, cfg, lambda name: None)
    slices = [int(d) for d in sections["baselines"]["slice_1nn"]]
    searched = [sizes for sizes, _ in searches]
    assert searched[0] == tuple(ctx.sizes)
    assert sorted(searched[1:]) == [(d,) for d in sorted(set(slices) - set(ctx.sizes))]
    # the shared search's numbers: the baselines' 1-NN and the float32 rows at a reported size are the
    # kNN and retrieval sections' own
    for d in SIZES:
        assert sections["baselines"]["slice_1nn"][d] == sections["knn"][d]["1nn"]
        row = sections["quantized"]["float32"][d]
        assert (row["map@10"], row["1nn"]) == (sections["retrieval"][d]["map@10"], sections["knn"][d]["1nn"])


def test_the_cpu_searches_each_size_with_faiss_by_default_and_a_gpu_in_one_pass(searches, monkeypatch):
    per_size: list[tuple[int, int]] = []
    real = context.exact_search
    monkeypatch.setattr(context, "exact_search", lambda *a, **k: per_size.append(a[2:4]) or real(*a, **k))
    ctx = _context(_compose("chunks.database=37"))
    assert ctx.search == "auto" and not ctx.one_pass
    got = {d: ctx.neighbours(d, 10) for d in SIZES}
    assert per_size == [(d, 10) for d in SIZES] and searches == []
    assert ctx.neighbours(4, 5).shape == (40, 5) and len(per_size) == len(SIZES)  # shallower: kept
    one_pass = _context(_compose("chunks.database=37", "search=one_pass"))
    for d in SIZES:  # the same neighbours both ways (these embeddings have no near-equal scores)
        np.testing.assert_array_equal(one_pass.neighbours(d, 10), got[d])
    assert searches == [(tuple(SIZES), 10)]
    # auto: the one pass where the evaluation runs on a GPU; a setting overrides it either way
    assert _context(_compose(), device=torch.device("cuda")).one_pass
    assert not _context(_compose("search=per_size"), device=torch.device("cuda")).one_pass


def _embedded(ctx: EvalContext, name: str, covered: tuple[int, ...], restrict: bool) -> EmbeddedSet:
    rng = np.random.default_rng(len(name))
    labels = rng.choice(covered, size=25)
    z = rng.normal(size=(25, 16)).astype(np.float32)
    spec = RobustnessSet(name, Path(f"/sets/{name}"), ImageFolder.__new__(ImageFolder), covered, restrict)
    return EmbeddedSet(QuerySet(name, None, {}, spec), z, labels)


def test_robustness_runs_in_the_registered_loop():
    assert [e.name for e in evaluators.EVALUATORS][-1] == "robustness"
    cfg = _compose()
    ctx = _context(cfg)
    done: list[str] = []
    assert "robustness" not in evaluators.run_evaluators(ctx, cfg, done.append)  # no sets: no section
    assert done == [e.name for e in evaluators.EVALUATORS]

    ctx = _context(cfg)
    ctx.query_sets = {"robustness": [_embedded(ctx, "a", (0, 2), True), _embedded(ctx, "b", (0, 1, 2), True)]}
    section = evaluators.run_evaluators(ctx, cfg, lambda name: None)["robustness"]
    assert list(section) == ["a", "b"]
    assert (section["a"]["restricted"], section["b"]["restricted"]) == (True, False)  # b covers them all
    for item, covered in zip(ctx.query_sets["robustness"], ((0, 2), None), strict=True):
        want = linear_accuracy(ctx.head, item.embeddings, item.labels, ctx.chunks.head, covered)
        assert section[item.set.name]["top1"] == {str(d): want[d]["top1"] for d in SIZES}
        assert section[item.set.name]["images"] == 25


def test_the_registry_opens_the_query_sets_and_checks_every_section(tiny_image_tree, tmp_path):
    from mrl.data.image_folder import ImageFolderDataModule

    datamodule = ImageFolderDataModule(root=str(tiny_image_tree), num_workers=0)
    assert evaluators.open_query_sets(_compose(), datamodule) == {"robustness": []}
    cfg = _compose(f"+robustness.sets.v={tiny_image_tree / 'val'}")
    ((name, (s,)),) = evaluators.open_query_sets(cfg, datamodule).items()
    assert (name, s.name, len(s.dataset)) == ("robustness", "v", len(s.spec.listing))
    assert s.identity["root"] == str((tiny_image_tree / "val").resolve())
    # each evaluator's checks run through the registry, with mrl-train's evaluate. prefix
    out = f"paths.output_dir={tmp_path}"
    config = OmegaConf.to_container(_compose(out, f"+robustness.sets.v={tmp_path / 'none'}"), resolve=True)
    with pytest.raises(MRLError, match=r"evaluate\.robustness\.sets\.v: .* does not exist"):
        check_eval_config(config, "evaluate.")
    config = OmegaConf.to_container(_compose(out, "quantized.k=0"), resolve=True)
    with pytest.raises(MRLError, match=r"quantized\.k=0 is not valid"):
        check_eval_config(config)
