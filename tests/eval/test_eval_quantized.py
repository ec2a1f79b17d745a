"""Quantised prefixes (``mrl.eval.quantized``): int8 and binary retrieval against a plain numpy reference
(calibration, codes, brute-force distances, top-k, mAP@k and 1-NN), exact bytes per vector, the report's
outputs, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from mrl.errors import MRLError
from mrl.eval import quantized as qz
from mrl.eval.knn import exact_search
from mrl.eval.quantized_outputs import quantized_plot, quantized_rows, quantized_summary, quantized_text
from support import reference_binary, reference_int8, reference_metrics, unit_prefix

SIZES = [2, 5, 16]  # 5: binary codes padded to a whole byte
K = 7


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """300 database items, 45 queries, 3 classes, 16 features; the database stored as float16 (as a
    float16 memmap would be), one feature constant and one never positive (a dead ReLU)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 16))
    db_y, q_y = rng.integers(0, 3, 300), rng.integers(0, 3, 45)
    db = (centers[db_y] + rng.normal(size=(300, 16))).astype(np.float16)
    q = (centers[q_y] + rng.normal(size=(45, 16))).astype(np.float32)
    db[:, 9], q[:, 9] = 0.5, 0.5
    db[:, 12], q[:, 12] = -np.abs(db[:, 12]), -np.abs(q[:, 12])
    return db, db_y, q, q_y


def settings(formats=("int8", "binary"), threshold="zero", k=K) -> qz.QuantizedSettings:
    # small chunks: the database is encoded and the queries searched over several chunks
    return qz.QuantizedSettings(tuple(formats), k, threshold, query_chunk=11, db_chunk=37)


def searched(db: np.ndarray, q: np.ndarray):
    """The neighbours the float32 rows rank by, searched exactly (what the evaluation context shares)."""
    return lambda d, k: exact_search(db, q, d, k, 11, 37, False)[1]


def test_int8_codes_scores_and_metrics_match_a_hand_quantisation():
    db, db_y, q, q_y = data()
    out = qz.quantized_retrieval(db, db_y, q, q_y, SIZES, settings(["int8"]), searched(db, q))
    assert list(out) == ["float32", "int8"] and list(out["int8"]) == SIZES
    for d in SIZES:
        codes, scores = reference_int8(db, q, d)
        stats = qz.prefix_stats(db, d, 37)
        index = qz.int8_index(db, d, stats, 37)
        stored = qz.faiss.vector_to_array(index.codes).reshape(len(db), d)
        np.testing.assert_array_equal(stored, codes)  # the same calibration and rounding, every code
        ids = qz.search_index(index, lambda x: x, q, d, K, 11)
        # each returned item has the reference's score, in the reference's order of scores (ties may
        # come in another order: d=2 codes collide)
        got = np.take_along_axis(scores, ids, axis=1)
        np.testing.assert_allclose(got, -np.sort(-scores, axis=1)[:, :K], atol=1e-5)
        assert all(len(set(row)) == K for row in ids)  # k distinct items
        want = reference_metrics(np.argsort(-scores, axis=1, kind="stable")[:, :K], db_y, q_y, K)
        assert out["int8"][d]["bytes"] == d  # one byte per feature
        if d > 2:  # no tied scores at these sizes: the same neighbours, the same numbers
            assert out["int8"][d] == pytest.approx({"bytes": d, **want}, abs=1e-12)


@pytest.mark.parametrize("threshold", ["zero", "mean"])
def test_binary_hamming_search_matches_popcount_and_ranks_ties_by_index(threshold):
    db, db_y, q, q_y = data(1)
    out = qz.quantized_retrieval(db, db_y, q, q_y, SIZES, settings(["binary"], threshold), searched(db, q))
    for d in SIZES:
        hamming = reference_binary(db, q, d, threshold)
        ids = np.argsort(hamming, axis=1, kind="stable")[:, :K]  # ties: the lower database index first
        stats = qz.prefix_stats(db, d, 37)
        index, encode = qz.quantized_index("binary", db, d, stats, settings(["binary"], threshold))
        np.testing.assert_array_equal(qz.search_index(index, encode, q, d, K, 11), ids)
        assert out["binary"][d] == pytest.approx(
            {"bytes": -(-d // 8), **reference_metrics(ids, db_y, q_y, K)}
        )
    # the threshold matters: the mean-centred bits are other bits than the signs here
    assert not np.array_equal(reference_binary(db, q, 16, "zero"), reference_binary(db, q, 16, "mean"))


def test_float32_rows_rank_by_the_shared_exact_search():
    db, db_y, q, q_y = data(2)
    asked = []

    def neighbours(d: int, k: int) -> np.ndarray:
        asked.append((d, k))
        return searched(db, q)(d, k)

    out = qz.quantized_retrieval(db, db_y, q, q_y, [4, 16], settings(["int8"]), neighbours)
    assert asked == [(4, K), (16, K)]  # the float32 rows search nothing themselves
    for d in (4, 16):
        cosine = unit_prefix(q, d).astype(np.float64) @ unit_prefix(db, d).T.astype(np.float64)
        ids = np.argsort(-cosine, axis=1, kind="stable")[:, :K]
        assert out["float32"][d] == pytest.approx({"bytes": 4 * d, **reference_metrics(ids, db_y, q_y, K)})


@pytest.mark.parametrize(
    ("formats", "threshold", "k", "words"),
    [
        (["int4"], "zero", 5, ["quantized.formats=['int4']", "int8, binary"]),
        (["int8", "int8"], "zero", 5, ["distinct"]),
        ([], "zero", 5, ["quantized.formats=[]"]),
        (["float32"], "zero", 5, ["float32 is always measured"]),
        (["binary"], "median", 5, ["quantized.binary_threshold='median'", "zero or mean"]),
        (["binary"], "zero", 0, ["quantized.k=0", "positive integer"]),
    ],
)
def test_bad_settings_are_refused(formats, threshold, k, words):
    with pytest.raises(MRLError) as info:
        qz.check_quantized({"quantized": {"formats": formats, "k": k, "binary_threshold": threshold}}, "")
    for word in words:
        assert word in str(info.value), str(info.value)


def test_k_larger_than_the_database_is_refused():
    db, db_y, q, q_y = data()
    with pytest.raises(MRLError, match=r"fewer than quantized\.k=400"):
        qz.quantized_retrieval(db, db_y, q, q_y, [4], settings(k=400), searched(db, q))


def test_outputs_show_every_format_and_size(tmp_path):
    section = {
        "float32": {
            "4": {"bytes": 16, "map@7": 0.5, "1nn": 0.6},
            "16": {"bytes": 64, "map@7": 0.7, "1nn": 0.8},
        },
        "binary": {"4": {"bytes": 1, "map@7": 0.3, "1nn": 0.4}, "16": {"bytes": 2, "map@7": 0.6, "1nn": 0.7}},
    }
    columns, rows = quantized_rows(section)
    assert columns == ["format", "size", "bytes", "map@7", "1nn"]
    assert rows == [
        ["float32", 4, 16, 0.5, 0.6],
        ["float32", 16, 64, 0.7, 0.8],
        ["binary", 4, 1, 0.3, 0.4],
        ["binary", 16, 2, 0.6, 0.7],
    ]
    summary = quantized_summary(section)
    assert (
        summary["eval/quantized/binary/map@7@16"] == 0.6 and summary["eval/quantized/float32/bytes@4"] == 16
    )
    assert len(summary) == 12
    text = "\n".join(quantized_text(section))
    assert "mAP@7" in text and "70.00" in text and "     2 B" in text
    png = quantized_plot(section, tmp_path / "quantized.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
