"""``evaluate=`` asking for more neighbours than the database split has, when the data settings tell that
size (synthetic sizes, limits of an in-memory data set, an image folder's or shards' images): refused
before training, and before a sweep starts any job (the sweep used to stop after its earlier jobs had
trained, when the evaluation found the split too small)."""

from __future__ import annotations

import pytest

from support import TINY

EVALUATE = "evaluate={methods: {adaptive_retrieval: false, baselines: false}}"  # retrieval.ks up to 100


def test_a_sweep_is_refused_before_its_first_job(run_main, tmp_path):
    result = run_main("mrl-train", "-m", *TINY, "data.train_size=512,50", "logger=none", EVALUATE)
    assert result.returncode == 1, result.output[-3000:]
    for text in ("Job 1 of the sweep", "data.train_size=50", "evaluate.retrieval.ks=[10, 25, 50, 100]"):
        assert text in result.output, result.output[-3000:]
    assert "Traceback" not in result.output and not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("data", "evaluate", "named"),
    [
        ((*TINY, "data.train_size=50"), EVALUATE, "(data.train_size=50)"),
        (  # the query split searched by itself: each query ranks the 63 others
            (*TINY,),
            "evaluate={database_split: test, query_split: test, knn: {k: 64}, retrieval: {ks: [10]}}",
            "test split, has 64 items (data.test_size=64), so each query has 63 other",
        ),
        (
            ("data=fashion_mnist", "+data.limit_train=40"),
            "evaluate={methods: {quantized: true}, quantized: {k: 50}, retrieval: {ks: [10]}}",
            "(data.limit_train=40)",
        ),
        (("data=imagefolder", "data.root={tree}"), "evaluate={knn: {k: 100}}", "train holds 96 images"),
        (("data=shards", "data.input_dir={shards}"), "evaluate={knn: {k: 100}}", "holds 96 train images"),
    ],
    ids=["synthetic", "same_split", "in_memory_limit", "image_folder", "shards"],
)
def test_a_single_run_is_refused_before_training(
    run_main, tmp_path, tiny_image_tree, tiny_shards, data, evaluate, named
):
    data = [d.format(tree=tiny_image_tree, shards=tiny_shards) for d in data]
    result = run_main("mrl-train", *data, "logger=none", "trainer.max_epochs=1", evaluate)
    assert result.returncode == 1, result.output[-3000:]
    assert named in result.output and "Lower evaluate." in result.output, result.output[-3000:]
    assert not list(tmp_path.glob("logs/train/runs/*/checkpoints/*.ckpt"))


def test_a_database_large_enough_goes_on():
    from mrl.eval.neighbour_counts import check_neighbours

    settings = {"methods": {"knn": True}, "knn": {"k": 64}, "retrieval": {"ks": [10]}}
    data = {"_target_": "mrl.data.synthetic.SyntheticDataModule", "train_size": 64, "test_size": 64}
    check_neighbours({**settings, "database_split": "train", "query_split": "test"}, data)  # 64 to rank
    with pytest.raises(Exception, match="63 other items"):
        check_neighbours({**settings, "database_split": "train", "query_split": "train"}, data)
