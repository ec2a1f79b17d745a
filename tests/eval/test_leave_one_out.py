"""Queries that are the database's own items (``query_split=train``, the same split twice, or two split
names for one data set): every search leaves each query out of its own neighbours, as retrieval
benchmarks do, instead of finding it first (1-NN 100%, an inflated mAP@10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrl.config_path import config_dir
from mrl.eval import evaluators
from mrl.eval.context import EvalContext, same_items
from mrl.eval.knn import exact_search
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.sparse_autoencoder import top_k_code
from mrl.nn.sparse_code_linear import SparseCodeLinear

SIZES = [2, 4, 8, 16]
# small and quick: every evaluator that searches runs (HNSW shortlists, int8 and binary rows, the
# reductions' 1-NN), on few sizes and funnels
QUICK = (
    "adaptive_classification.num_splits=2",
    "adaptive_retrieval.shortlist_sizes=[4]",
    "adaptive_retrieval.shortlist_k=20",
    "adaptive_retrieval.funnel.shortlist_size=2",
    "adaptive_retrieval.funnel.rerank_sizes=[4,full]",
    "adaptive_retrieval.funnel.shortlists=[20,10]",
    "adaptive_retrieval.hnsw=true",
    "baselines.knn=true",
    "baselines.max_iter=20",
    "quantized.formats=[int8,binary]",
)


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unset", *overrides])


def _own_context(cfg: DictConfig, labels: np.ndarray, kind: str = "standard") -> EvalContext:
    """An evaluation whose queries are its database (the same arrays, as one split exported once)."""
    rng = np.random.default_rng(0)
    classes = int(labels.max()) + 1
    if kind == "csr":
        z = top_k_code(torch.from_numpy(rng.normal(size=(len(labels), 48)).astype(np.float32)), 8).numpy()
        torch.manual_seed(0)
        head = SparseCodeLinear(48, classes, [2, 4, 8])
    else:
        centers = rng.normal(size=(classes, 16)).astype(np.float32)
        z = centers[labels] + rng.normal(size=(len(labels), 16)).astype(np.float32)
        torch.manual_seed(0)
        head = MatryoshkaLinear(16, classes, SIZES)
    own = same_items((z, labels), (z, labels), same_split=True)
    return EvalContext.from_config(
        cfg, (z, labels), (z, labels), head, list(head.nesting), kind, torch.device("cpu"), own
    )


def _searched_numbers(sections: dict) -> dict[str, float]:
    """Every number of ``sections`` that comes from ranking database items for each query."""
    out: dict[str, float] = {}
    for d, row in sections["knn"].items():
        out |= {f"knn.{d}.{key}": v for key, v in row.items()}
    for d, row in sections["retrieval"].items():
        out |= {f"retrieval.{d}.{key}": v for key, v in row.items() if not key.startswith("recall")}
    for i, row in enumerate(sections.get("adaptive_retrieval", [])):
        out |= {f"funnel.{i}.{row['index']}.{key}": row[key] for key in ("map@10", "top1")}
    for key in ("map@10", "top1"):
        if sections.get("exact_retrieval"):
            out[f"exact_retrieval.{key}"] = sections["exact_retrieval"][key]
    for name in ("svd", "slice", "svd_1nn", "slice_1nn"):  # probes tested on items they did not train on
        out |= {f"baselines.{name}.{d}": v for d, v in sections.get("baselines", {}).get(name, {}).items()}
    for fmt, rows in sections["quantized"].items():
        for d, row in rows.items():
            out |= {f"quantized.{fmt}.{d}.{key}": v for key, v in row.items() if key != "bytes"}
    return out


@pytest.mark.filterwarnings("ignore:The number of unique classes")  # the probes, one item per class
@pytest.mark.parametrize("kind", ["standard", "csr"])
def test_no_search_finds_the_query_itself(kind):
    """Every item its own class: a query's only relevant item is itself, so every number that ranks
    database items (kNN, retrieval, funnels flat and HNSW, exact search, the reductions' 1-NN and probes,
    float32/int8/binary rows, a CSR model's sparse searches) is 0 when each query is left out, and would
    be 100% (1-NN) if a search found the query."""
    cfg = _compose(*QUICK, "retrieval.ks=[5,10]", "knn.k=5", "quantized.k=5")
    ctx = _own_context(cfg, np.arange(60), kind)
    assert ctx.exclude_self and ctx.candidates == 59
    sections = evaluators.run_evaluators(ctx, cfg, lambda name: None)
    numbers = _searched_numbers(sections)
    assert len(numbers) > (20 if kind == "csr" else 70), sorted(numbers)
    assert {k: v for k, v in numbers.items() if v != 0} == {}


def _reference_neighbours(z: np.ndarray, d: int, k: int) -> np.ndarray:
    """Cosine of the size-d prefixes by a dense product, each item's own score removed; ties: lower id."""
    p = z[:, :d] / np.linalg.norm(z[:, :d], axis=1, keepdims=True)
    scores = p.astype(np.float64) @ p.T.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _votes(neighbour_labels: np.ndarray) -> np.ndarray:
    """The majority label of each row; a tie goes to the class met first (nearest)."""
    out = []
    for row in neighbour_labels.tolist():
        most = max(row.count(c) for c in row)
        out.append(next(c for c in row if row.count(c) == most))
    return np.array(out)


def test_knn_and_retrieval_of_a_split_against_itself_match_a_reference():
    """3 classes, 90 items: 1-NN, k-NN, mAP@10 and recall@10 (relevant = the other items of the class)."""
    cfg = _compose(*QUICK, "retrieval.ks=[10]", "knn.k=5", "methods.baselines=false")
    labels = np.random.default_rng(1).integers(0, 3, 90)
    ctx = _own_context(cfg, labels)
    sections = evaluators.run_evaluators(ctx, cfg, lambda name: None)
    z = ctx.database
    others = np.bincount(labels)[labels] - 1
    for d in SIZES:
        ids = _reference_neighbours(z, d, 10)
        hits = labels[ids] == labels[:, None]
        precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, 11)
        assert sections["knn"][d]["1nn"] == pytest.approx(hits[:, 0].mean())
        assert sections["knn"][d]["knn"] == pytest.approx(np.mean(_votes(labels[ids[:, :5]]) == labels))
        assert sections["retrieval"][d]["map@10"] == pytest.approx((precision_at_i * hits).sum(1).mean() / 10)
        assert sections["retrieval"][d]["recall@10"] == pytest.approx((hits.sum(1) / others).mean())
        assert sections["quantized"]["float32"][d]["1nn"] == sections["knn"][d]["1nn"]


def test_exact_search_leaves_out_each_query_in_every_chunk():
    """Queries and database in several chunks: the result is the reference's, never the query."""
    z = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    _, ids = exact_search(z, z, 8, 6, query_chunk=7, db_chunk=11, use_gpu=False, exclude_self=True)
    np.testing.assert_array_equal(ids, _reference_neighbours(z, 8, 6))
    _, found = exact_search(z, z, 8, 6, query_chunk=7, db_chunk=11, use_gpu=False)
    assert (found[:, 0] == np.arange(50)).all()  # without it, each query finds itself first


def test_two_names_for_one_data_set_are_the_same_items():
    """An image folder or shards without a test split evaluate the validation images as ``test``: the
    same exported embeddings and labels under two names are recognised; other items are not."""
    rng = np.random.default_rng(3)
    z, y = rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, 30)
    assert same_items((z, y), (z.copy(), y.copy()), same_split=False)
    assert same_items((z, y), (z[::-1].copy(), y[::-1].copy()), same_split=True)  # by name
    assert not same_items((z, y), (z[::-1].copy(), y[::-1].copy()), same_split=False)
    assert not same_items((z, y), (z[:29], y[:29]), same_split=False)
    other = z.copy()
    other[-1, -1] += 1
    assert not same_items((z, y), (other, y), same_split=False)
