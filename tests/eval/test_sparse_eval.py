"""mrl-eval on a CSR model (head=csr): the size-k view is the top-k code of the stored embedding, not a
prefix, searched by cosine as a sparse product. Checked against a dense reference written here; what does
not apply to codes is skipped with its reason; and one end-to-end run (source -> csr -> mrl-eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrl.config_path import config_dir
from mrl.eval import context, evaluators
from mrl.eval.context import EvalContext
from mrl.eval.knn import exact_search
from mrl.eval.report_file import build_report
from mrl.eval.sparse_codes import sparse_code_bytes, top_codes
from mrl.eval.sparse_eval import NOT_FOR_CODES, code_search
from mrl.eval.summary import summary_text
from mrl.nn.sparse_autoencoder import top_k_code
from mrl.nn.sparse_code_linear import SparseCodeLinear
from support import reference_metrics

HIDDEN, K_MAX, SIZES, CLASSES = 48, 8, [2, 4, 8], 3
CPU = torch.device("cpu")


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unset", *overrides])


def stored_codes(labels: np.ndarray, seed: int) -> np.ndarray:
    """What a CSR model exports: each row the code of its largest k (K_MAX units of HIDDEN, ReLU'd),
    class-dependent so that neighbours mean something."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(CLASSES, HIDDEN))
    pre = torch.from_numpy((centers[labels] + rng.normal(size=(len(labels), HIDDEN))).astype(np.float32))
    return top_k_code(pre, K_MAX).numpy()


def reference_codes(z: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest entries (others 0), L2-normalised, in float64."""
    out = np.zeros(z.shape)
    for row, codes in zip(z, out, strict=True):
        top = np.argsort(-row, kind="stable")[:k]
        codes[top] = np.maximum(row[top], 0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def reference_neighbours(db: np.ndarray, q: np.ndarray, k_code: int, k: int) -> np.ndarray:
    """Every score as a dense product of the reference codes; best first, ties to the lower index."""
    scores = reference_codes(q, k_code) @ reference_codes(db, k_code).T
    return np.array([sorted(range(len(db)), key=lambda j, row=row: (-row[j], j))[:k] for row in scores])


def csr_context(cfg: DictConfig) -> EvalContext:
    """A tiny CSR evaluation (120 database codes, 30 queries), built as mrl.eval.run builds it."""
    rng = np.random.default_rng(0)
    db_y, q_y = rng.integers(0, CLASSES, 120), rng.integers(0, CLASSES, 30)
    torch.manual_seed(0)
    head = SparseCodeLinear(HIDDEN, CLASSES, SIZES)
    data = (stored_codes(db_y, 1), db_y), (stored_codes(q_y, 2), q_y)
    return EvalContext.from_config(cfg, *data, head, SIZES, "csr", torch.device("cpu"))


def test_code_search_ranks_top_k_codes_by_cosine_and_times_itself():
    ctx = csr_context(_compose())
    for d in SIZES:
        codes = top_codes(ctx.database, d, rows=25)
        ids, measured = code_search(codes, ctx.queries, d, 7, 25, 4, "float32", False, CPU)
        np.testing.assert_array_equal(ids, reference_neighbours(ctx.database, ctx.queries, d, 7))
        assert measured["k"] == 7 and measured["active_units"] == d  # every kept unit is positive here
        assert measured["device"] == "cpu"
        assert measured["search_seconds"] > 0 and measured["seconds_per_query"] == pytest.approx(
            measured["search_seconds"] / 30
        )
    # the codes are not the prefixes: the first two units of a code rank otherwise
    prefix = exact_search(ctx.database, ctx.queries, 2, 7, 4096, 4096, False)[1]
    found = code_search(ctx.database_codes(2), ctx.queries, 2, 7, 4096, 4096, "float32", False, CPU)[0]
    assert not np.array_equal(prefix, found)


def test_a_csr_evaluation_sorts_the_database_codes_once_for_every_size(monkeypatch):
    passes = []
    real = context.top_codes

    def counted(embeddings, width, rows):
        passes.append(width)
        return real(embeddings, width, rows)

    monkeypatch.setattr(context, "top_codes", counted)
    cfg = _compose("retrieval.ks=[5,10]", "knn.k=5", "quantized.k=5", "adaptive_classification.num_splits=2")
    evaluators.run_evaluators(csr_context(cfg), cfg, lambda name: None)
    assert passes == [max(SIZES)]  # one pass, as wide as the largest size, for kNN, retrieval and quantized


def test_a_csr_evaluation_measures_codes_and_skips_what_needs_prefixes():
    cfg = _compose("retrieval.ks=[5,10]", "knn.k=5", "quantized.k=5", "adaptive_classification.num_splits=2")
    ctx = csr_context(cfg)
    done: list[str] = []
    sections = evaluators.run_evaluators(ctx, cfg, done.append)
    assert done == [e.name for e in evaluators.EVALUATORS]  # a skipped stage is still timed
    assert set(sections["skipped"]) == {*NOT_FOR_CODES, "quantized.formats"}
    assert "adaptive_retrieval" not in sections and "baselines" not in sections
    db, q, db_y, q_y = ctx.database, ctx.queries, ctx.db_labels, ctx.query_labels
    for d in SIZES:
        ids = reference_neighbours(db, q, d, 10)
        assert sections["knn"][d]["1nn"] == pytest.approx(np.mean(db_y[ids[:, 0]] == q_y))
        assert sections["retrieval"][d]["map@10"] == pytest.approx(
            reference_metrics(ids, db_y, q_y, 10)["map@10"]
        )
        assert set(sections["sparse_retrieval"][d]) == {
            "k", "index_seconds", "search_seconds", "seconds_per_query", "active_units", "device"
        }  # fmt: skip
        # the stored codes: k values and k indices of one byte (48 units), float32 from the shared search
        float32, float16 = sections["quantized"]["float32"][d], sections["quantized"]["float16"][d]
        assert float32 == {"bytes": d * 5, **reference_metrics(ids[:, :5], db_y, q_y, 5)}
        # float16: the database's normalised values rounded to float16, the queries' kept in float32
        stored = reference_codes(db, d).astype(np.float16).astype(np.float64)
        scores = reference_codes(q, d) @ stored.T
        ids16 = np.array([sorted(range(len(db)), key=lambda j, row=row: (-row[j], j))[:5] for row in scores])
        assert float16 == {
            "bytes": sparse_code_bytes(d, HIDDEN, "float16"),
            **reference_metrics(ids16, db_y, q_y, 5),
        }
    # the linear and adaptive stages read the head, which takes each size's top-k code itself
    assert set(sections["linear"]) == set(SIZES) and sections["adaptive_classification"]
    report = build_report(SIZES, sections, {}, code_units=HIDDEN)
    assert report["bytes"] == {
        "csr": {
            fmt: {str(d): sparse_code_bytes(d, HIDDEN, fmt) for d in SIZES} for fmt in ("float32", "float16")
        }
    }
    assert list(report["sparse_retrieval"]) == ["2", "4", "8"] and report["skipped"] == sections["skipped"]
    text = summary_text(report)
    assert "sparse retrieval (cosine of top-k codes, scipy CSR on the CPU)" in text
    assert "quantized sparse codes" in text
    assert "not measured:" in text and "adaptive_retrieval: its funnels" in text


@pytest.mark.slow
def test_mrl_eval_of_a_csr_checkpoint(run_main, tmp_path):
    """A source model, a CSR head on its frozen features, and mrl-eval of it: the report's sections."""
    common = ("debug=tiny", "logger=csv")
    assert run_main("mrl-train", *common, f"hydra.run.dir={tmp_path / 'src'}").returncode == 0
    source = f"source={tmp_path / 'src' / 'checkpoints' / 'last.ckpt'}"
    csr_dir = tmp_path / "csr"
    result = run_main(
        "mrl-train", *common, source, "head=csr", "head.nesting=[4,16]", f"hydra.run.dir={csr_dir}"
    )
    assert result.returncode == 0, result.output[-3000:]
    out = tmp_path / "eval"
    result = run_main(
        "mrl-eval", f"ckpt_path={csr_dir / 'checkpoints' / 'last.ckpt'}", "logger=none", "threads=1",
        "adaptive_classification.num_splits=2", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.output[-3000:]
    report = json.loads((out / "report.json").read_text())
    hidden = int(np.load(out / "train_embeddings.npy", mmap_mode="r").shape[1])
    assert report["sizes"] == [4, 16] and list(report["sparse_retrieval"]) == ["4", "16"]
    assert report["bytes"]["csr"]["float32"] == {str(k): sparse_code_bytes(k, hidden) for k in (4, 16)}
    assert set(report["quantized"]) == {"float32", "float16"} and set(report["skipped"]) == {
        "adaptive_retrieval", "baselines", "quantized.formats"
    }  # fmt: skip
    assert report["adaptive_retrieval"] == [] and report["baselines"]["svd"] == {}
    # the kNN section is the sparse search's: recomputed here from the exported codes
    db = np.load(out / "train_embeddings.npy")
    q = np.load(out / "test_embeddings.npy")
    db_y, q_y = np.load(out / "train_labels.npy"), np.load(out / "test_labels.npy")
    ids = reference_neighbours(db, q, 4, 1)
    assert report["knn"]["4"]["1nn"] == pytest.approx(np.mean(db_y[ids[:, 0]] == q_y))
    assert "sparse retrieval" in result.stdout and "not measured:" in result.stdout
    # the exported model embeds as the evaluation searched: the top-k code, L2-normalised
    import mrl

    model = mrl.load(out / "model.safetensors")
    assert model.sparse and model.embed_dim == hidden and model.nesting == [4, 16]
