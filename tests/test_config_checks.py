"""Pre-flight checks (each feature's checks, mrl.preflight): every config the project ships passes, and each
bad value gets an MRLError naming the key and what to write. The end-to-end refusals through the real
commands are in test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrl import preflight
from mrl.config_checks import accepted_keys, check_known_keys
from mrl.config_path import config_dir
from mrl.errors import MRLError, user_message
from mrl.eval.checks import check_eval_config
from mrl.models.checks import config_nesting
from mrl.resolvers import register_resolvers
from mrl.training.checks import check_optimized_metric, check_train_config, check_trainer, metric_names

CONF = Path(config_dir())
GROUPS = ["data", "backbone", "head", "optim", "sched", "trainer"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
NEEDS = {
    "imagefolder": ["data.root=/data/tree"],
    "imagenet_folder": ["data.root=/data/tree"],
    "shards": ["data.input_dir=/data/shards"],
    "imagenet": ["data.input_dir=/data/shards"],
    # the heads that only train on a frozen source's features
    "csr": ["source=backbone"],
    "adaptor": ["source=backbone"],
}


def _train_config(*overrides: str) -> dict:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/job", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_shipped_option_passes(group, option):
    config = _train_config(f"{group}={option}", *NEEDS.get(option, []))
    check_train_config(config)
    check_known_keys(config["data"], "data")
    preflight.probe_optimizer(config)


def test_the_optuna_sweep_config_passes():
    config = _train_config("hparams_search=optuna")
    assert config["optimized_metric"]
    check_train_config(config)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_passes(name):
    config = _train_config(f"experiment={name}")  # a missing data path stays '???': not judged here
    preflight.check_train(OmegaConf.create(config))  # with the recipes' evaluate= settings


def test_the_default_eval_config_passes():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x.ckpt", "paths.output_dir=/tmp/job"])
    check_eval_config(OmegaConf.to_container(cfg, resolve=True))


def _with(config: dict, dotted: str, value) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


TRAIN_CASES = [
    ("head.nesting", 8, ["head.nesting=8 is a single value", "head.nesting=[8]"]),
    ("head.nesting", [8, 4], ["strictly increasing"]),
    ("head.weights", [1, 2], ["head.weights has 2 entries", "one relative importance weight per size"]),
    ("head.weights", [0, 0], ["head.weights", "not all 0"]),
    ("head.dim", 0, ["head=ff needs", "head.dim=0"]),
    ("data.batch_size", 0, ["data.batch_size=0", "positive integer", "data.batch_size=256"]),
    ("data.batch_size", "big", ["data.batch_size='big'"]),
    ("data.num_workers", "auto", ["data.num_workers='auto'", "a number of loader workers"]),
    ("data.num_workers", -1, ["data.num_workers=-1"]),
    ("backbone.embed_dim", -3, ["backbone.embed_dim=-3", "positive integer", "or null"]),
    ("backbone.drop_path_rate", 2.0, ["backbone.drop_path_rate=2.0", "from 0 to 1"]),
    ("optim.lr", -1, ["optim.lr=-1", "above 0"]),
    ("optim.lr", "fast", ["optim.lr='fast' is not a number"]),
    ("optim.weight_decay", -0.1, ["optim.weight_decay=-0.1"]),
    ("optim.fused", "yes", ["optim.fused='yes'", "true or false"]),
    ("trainer.max_epochs", -1, ["trainer.max_epochs=-1", "sched=none", "+trainer.max_steps"]),
    ("trainer.max_epochs", -5, ["trainer.max_epochs=-5"]),
    ("trainer.max_epochs", 2.5, ["trainer.max_epochs=2.5"]),
    ("trainer.log_every_n_steps", 0, ["trainer.log_every_n_steps=0"]),
    ("loss.label_smoothing", 1.5, ["loss.label_smoothing=1.5"]),
    ("threads", 0, ["threads=0"]),
    ("test", "yes", ["test='yes'", "true or false"]),
    ("evaluate", True, ["evaluate=True", "evaluate={}"]),
    ("optimized_metric", "val/accuracy", ["not a metric this job logs", "val/acc@full"]),
    ("optimized_metric", "valid/acc@8", ["not a metric this job logs"]),
    ("optimized_metric", "train/top5@8", ["not a metric this job logs"]),
    ("optimized_metric", "val/acc@eight", ["'@eight' is not a size"]),
]


@pytest.mark.parametrize(
    ("key", "value", "expected"), TRAIN_CASES, ids=[f"{k}={v}" for k, v, _ in TRAIN_CASES]
)
def test_bad_train_values_name_the_key(key, value, expected):
    config = _train_config("head=ff" if key == "head.dim" else "head=mrl", "data=synthetic")
    if key == "head.weights":
        config["head"]["nesting"] = [4, 8, 16] if value == [1, 2] else None
    with pytest.raises(MRLError) as info:
        check_train_config(_with(config, key, value))
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_max_epochs_minus_one_is_fine_with_a_step_limit_or_a_constant_lr():
    check_trainer({"max_epochs": -1, "max_steps": 100}, has_schedule=True)
    check_trainer({"max_epochs": -1}, has_schedule=False)
    check_trainer({"max_epochs": 0}, has_schedule=True)  # a zero-step run is not refused here


def test_optimized_metric_names_follow_the_nesting_and_stages():
    stages = ("train", "val", "test")
    for good in ("val/acc@full", "val/acc@8", "test/top5@16", "val/loss", "train/loss@8", "train/lr"):
        check_optimized_metric(good, [8, 16], stages)
    with pytest.raises(
        MRLError, match=r"names size 3, which this job does not train \(its sizes \[8, 16\]\)"
    ):
        check_optimized_metric("val/acc@3", [8, 16], stages)
    check_optimized_metric("val/acc@3", None, stages)  # sizes not known yet: checked once built
    with pytest.raises(MRLError, match="test=false"):
        check_optimized_metric("test/acc@8", [8], ("train", "val"))
    with pytest.raises(MRLError, match="not a metric this job logs"):
        check_optimized_metric("val/top5@8", [8], stages, top5=False)  # fewer than 5 classes
    assert set(metric_names([8], ("train", "val"))) == {
        "train/loss",
        "val/loss",
        "train/lr",
        "train/acc@8",
        "train/loss@8",
        "val/acc@8",
        "val/top5@8",
        "val/loss@8",
    }


def test_nesting_known_from_the_config_alone():
    assert config_nesting({"kind": "ff", "dim": 8}, None) == [8]
    assert config_nesting({"kind": "standard"}, 64) == [64]
    assert config_nesting({"kind": "mrl", "nesting": None, "min_size": 8}, 64) == [8, 16, 32, 64]
    assert config_nesting({"kind": "mrl", "nesting": None}, None) is None


def test_built_model_checks_metric_and_evaluate_sizes():
    cfg = OmegaConf.create({"optimized_metric": "val/acc@4", "evaluate": {"sizes": [8]}})
    with pytest.raises(MRLError, match="names size 4"):
        preflight.check_built(cfg, [8, 16], True)
    cfg.optimized_metric = "val/acc@8"
    cfg.evaluate.sizes = [8, 12]
    with pytest.raises(MRLError, match=r"evaluate.sizes=\[8, 12\] includes sizes .* \[12\]"):
        preflight.check_built(cfg, [8, 16], True)


EVAL_CASES = [
    ("knn.k", 0, ["knn.k=0", "positive integer", "knn.k=10"]),
    ("retrieval.ks", [10, 0], ["retrieval.ks=[10, 0]"]),
    ("retrieval.ks", [], ["retrieval.ks=[]"]),
    ("methods.knn", "yes", ["methods.knn='yes'", "true or false"]),
    ("device", "gpu", ["device='gpu'", "auto, cpu, cuda"]),
    ("embedding_dtype", "int8", ["embedding_dtype='int8'", "must be float32 or float16"]),
    ("search", "faiss", ["search='faiss'", "must be auto, one_pass or per_size"]),
    ("sizes", 8, ["sizes=8", "list of positive integers"]),
    ("adaptive_classification.calibration_fraction", 1.0, ["calibration_fraction=1.0"]),
    ("adaptive_classification.targets", [0.5, 2], ["targets=[0.5, 2]"]),
    ("adaptive_retrieval.funnel.shortlists", [200, 100], ["funnel.rerank_sizes has 5 entries"]),
    ("adaptive_retrieval.rerank_size", "big", ["rerank_size='big'", "'full'"]),
    ("baselines.models", "some", ["baselines.models='some'", "must be all or standard"]),
    ("baselines.knn", "maybe", ["baselines.knn='maybe'", "must be true, false or auto"]),
    ("baselines.knn", 1, ["baselines.knn=1"]),
    ("chunks.query", 0, ["chunks.query=0"]),
    ("threads", -2, ["threads=-2"]),
    ("quantized.formats", ["int8", "int4"], ["quantized.formats=['int8', 'int4']", "among int8, binary"]),
    ("quantized.formats", ["binary", "binary"], ["distinct formats"]),
    ("quantized.k", 0, ["quantized.k=0", "positive integer"]),
    ("quantized.binary_threshold", "median", ["quantized.binary_threshold='median'", "must be zero or mean"]),
]


@pytest.mark.parametrize(("key", "value", "expected"), EVAL_CASES, ids=[f"{k}={v}" for k, v, _ in EVAL_CASES])
def test_bad_eval_values_name_the_key(key, value, expected):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x.ckpt", "paths.output_dir=/tmp/job"])
    config = _with(OmegaConf.to_container(cfg, resolve=True), key, value)
    with pytest.raises(MRLError) as info:
        check_eval_config(config)
    for text in expected:
        assert text in str(info.value), str(info.value)
    with pytest.raises(MRLError, match="evaluate." + key.split(".")[0]):
        check_eval_config(config, prefix="evaluate.")


def test_unknown_data_keys_are_named_with_the_valid_ones():
    data = {"_target_": "mrl.data.synthetic.SyntheticDataModule", "batch_size": 8, "img_size": 32}
    assert {"batch_size", "eval_batch_size", "img_size", "num_classes", "pin_memory"} <= accepted_keys(
        data["_target_"]
    )
    with pytest.raises(MRLError, match=r"data has no setting 'dta_dir'.*valid data keys are: batch_size"):
        check_known_keys({**data, "dta_dir": "/x"}, "data")
    check_known_keys(data, "data", {"eval_batch_size": 4})
    with pytest.raises(MRLError, match="'dta_dir'"):
        check_known_keys(data, "data", {"dta_dir": "/x"})
    assert accepted_keys("torch.nn.Linear") is None  # only mrl components are judged


def test_optimizer_and_schedule_are_built_once_before_training():
    config = _train_config("data=synthetic")
    config["optim"]["opt"] = "adamx"
    with pytest.raises(MRLError, match=r"optimizer settings do not work.*adamx"):
        preflight.probe_optimizer(config)
    config = _train_config("data=synthetic", "sched=cyclic")
    config["sched"]["peak_epoch"] = "soon"
    with pytest.raises(MRLError, match="schedule settings do not work"):
        preflight.probe_optimizer(config)


def test_corrupt_run_config_is_refused(tmp_path):
    path = tmp_path / "resolved_config.yaml"
    path.write_text("data: {_target_: x\n  foo: [1,\n")
    with pytest.raises(MRLError, match=r"is corrupt and cannot be read \(.* at line 2\)"):
        preflight.check_run_config_file(path)
    path.write_bytes(bytes(range(256)))
    with pytest.raises(MRLError, match="is corrupt"):
        preflight.check_run_config_file(path)
    path.write_text("- [1, 2]\n")
    with pytest.raises(MRLError, match="not a complete mrl-train config"):
        preflight.check_run_config_file(path)


def test_an_error_from_a_loader_worker_keeps_only_its_message():
    class Wrapped(MRLError):
        pass

    worker = (
        "Caught Wrapped in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise Wrapped(...)\n'
        f"{Wrapped.__module__}.{Wrapped.__qualname__}: Cannot decode /data/a.jpg (truncated): replace it.\n"
    )
    assert user_message(Wrapped(worker)) == "Cannot decode /data/a.jpg (truncated): replace it."
    assert user_message(MRLError("plain")) == "plain"
