"""Every recipe in experiments/ composes, and runs a few training steps on synthetic data of its
dataset's shape through mrl-train's main (CPU, small batches)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mrl.config_path import config_dir
from mrl.eval.locations import find_evaluations
from mrl.resolvers import linear_lr, register_resolvers
from support import read_results

EXPERIMENTS_DIR = Path(config_dir()) / "experiment"
RECIPES = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
# The shape of each recipe's data set, as synthetic data: (classes, channels, pixels).
SHAPES = {"imagenet": (1000, 3, 192), "imagenet_vit": (1000, 3, 224), "fashion_mnist": (10, 1, 28)}
FEW_STEPS = [
    "trainer=cpu",
    "trainer.devices=1",
    "+trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "logger=csv",
    "threads=2",
]


def _shape(recipe: str) -> tuple[int, int, int]:
    if recipe.startswith("imagenet_vit"):
        return SHAPES["imagenet_vit"]
    if recipe.startswith("imagenet") or recipe == "retrofit":
        return SHAPES["imagenet"]
    return SHAPES["fashion_mnist"]


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _resolved(cfg) -> dict:
    """Every interpolation outside Hydra's own node resolved (the lr scaling rule included)."""
    return {k: _resolve_key(cfg, k) for k in cfg if k != "hydra"}


def _resolve_key(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def test_every_recipe_states_purpose_command_and_result():
    assert {"fashion_mnist_compare", "imagenet_r50_mrl", "imagenet_r50_mrl_e", "imagenet_r50_ff"} <= set(
        RECIPES
    )
    assert {"imagenet_vit_mrl", "retrofit"} <= set(RECIPES)
    for recipe in RECIPES:
        header = (EXPERIMENTS_DIR / f"{recipe}.yaml").read_text().split("\n\n", 1)[0]
        assert "mrl-train" in header, f"{recipe}: the header must give the command"
        assert "Result" in header, f"{recipe}: the header must state the result it produced (or why not)"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_resolves(recipe):
    cfg = _compose(
        f"experiment={recipe}", "paths.output_dir=/tmp/job", "++data.input_dir=/data/imagenet-shards"
    )
    # every interpolation outside Hydra's own node resolves (the lr scaling rule included)
    resolved = _resolved(cfg)
    assert resolved["trainer"]["max_epochs"] >= 1
    assert resolved["optim"]["lr"] > 0


def test_paper_r50_recipe():
    cfg = _resolved(_compose("experiment=imagenet_r50_mrl", "paths.output_dir=/tmp/j"))
    assert cfg["optim"]["lr"] == pytest.approx(1.7)
    assert cfg["optim"]["opt"] == "momentum" and cfg["optim"]["momentum"] == 0.9
    assert cfg["optim"]["weight_decay"] == pytest.approx(1e-4)
    assert cfg["loss"]["label_smoothing"] == 0.1
    assert cfg["trainer"]["max_epochs"] == 40 and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["channels_last"] is True
    assert cfg["head"]["nesting"] == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    two = _compose("experiment=imagenet_r50_mrl", "trainer.devices=2", "paths.output_dir=/tmp/j")
    assert OmegaConf.to_container(two.optim, resolve=True)["lr"] == pytest.approx(0.425)
    ff = _compose("experiment=imagenet_r50_ff", "paths.output_dir=/tmp/j")
    assert ff.head.kind == "ff" and ff.optim.weight_decay == pytest.approx(1e-4)


def _sweep(recipe: str) -> dict[str, list]:
    """The values a multirun recipe sweeps, per key, as Hydra's sweeper parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = _compose(f"experiment={recipe}", "paths.output_dir=/tmp/j").hydra.sweeper.params
    return {
        key: list(parser.parse_override(f"{key}={value}").sweep_iterator()) for key, value in params.items()
    }


def test_claim_recipes_sweep_what_their_claims_need():
    """fashion_mnist_seeds: MRL and FF at d=1 on 20 seeds, the compare recipe's model, no evaluation;
    fashion_mnist_relu_baselines: standard and MRL with and without the linear embedding on 5 seeds,
    the standard models' baselines evaluated up to d=8 as the compare recipe does."""
    compare = _resolved(_compose("experiment=fashion_mnist_compare", "paths.output_dir=/tmp/j"))
    seeds_cfg = _resolved(_compose("experiment=fashion_mnist_seeds", "paths.output_dir=/tmp/j"))
    seeds = _sweep("fashion_mnist_seeds")
    assert seeds["head"] == [{"kind": "mrl"}, {"kind": "ff", "dim": 1}]
    assert seeds["seed"] == list(range(20))
    for key in ("backbone", "head", "trainer", "optim", "loss", "data"):
        assert seeds_cfg[key] == compare[key], key
    assert seeds_cfg["evaluate"] is None
    relu_cfg = _resolved(_compose("experiment=fashion_mnist_relu_baselines", "paths.output_dir=/tmp/j"))
    relu = _sweep("fashion_mnist_relu_baselines")
    assert relu["head"] == [{"kind": "standard"}, {"kind": "mrl"}]
    assert relu["backbone.embed_dim"] == [64, None]
    assert relu["seed"] == [0, 1, 2, 3, 4]
    assert {k: v for k, v in relu_cfg["backbone"].items() if k != "embed_dim"} == {
        k: v for k, v in compare["backbone"].items() if k != "embed_dim"
    }
    for key in ("head", "trainer", "optim", "loss", "data"):
        assert relu_cfg[key] == compare[key], key
    relu_baselines, compare_baselines = relu_cfg["evaluate"]["baselines"], compare["evaluate"]["baselines"]
    assert relu_baselines.pop("sizes") == [1, 2, 4, 8]  # the sizes the claims compare (up to d=8)
    compare_baselines.pop("sizes")
    assert relu_baselines == compare_baselines  # the same probes
    assert relu_cfg["evaluate"]["methods"]["baselines"] is True


def _header_evaluate(recipe: str) -> dict:
    """The ``evaluate=`` override the recipe's header gives its other steps (``E='...'``), composed."""
    header = (EXPERIMENTS_DIR / f"{recipe}.yaml").read_text().split("\n\n", 1)[0]
    lines = header.split("#   E='", 1)[1].split("\n")
    text = ""
    for line in lines:
        text += line.removeprefix("#   '").rstrip("\\").rstrip("'")
        if not line.endswith("\\"):
            break
    return _resolved(_compose(text, "head=standard", "paths.output_dir=/tmp/j"))["evaluate"]


def test_posthoc_recipe_heads_and_the_steps_beside_it_measure_alike():
    """fashion_mnist_posthoc: csr, adaptor and mrl heads on 3 seeds, on the source's own split (one
    feature cache), the source given on the command line; the source and end-to-end MRL steps of its
    header evaluate with the same 1-NN and retrieval settings, and probe the standard model's baselines
    at every size the heads report."""
    sweep = _sweep("fashion_mnist_posthoc")
    assert sweep == {"head": ["csr", "adaptor", "mrl"], "seed": [0, 1, 2]}
    cfg = _resolved(_compose("experiment=fashion_mnist_posthoc", "paths.output_dir=/tmp/j"))
    assert cfg["source"] is None and cfg["data"]["seed"] == 0
    heads, steps = cfg["evaluate"], _header_evaluate("fashion_mnist_posthoc")
    for key in ("knn", "retrieval", "data", "sizes", "database_split", "query_split", "embedding_dtype"):
        assert heads.get(key) == steps.get(key), key
    for method in ("linear", "knn", "retrieval"):
        assert heads["methods"][method] and steps["methods"].get(method, True), method
    assert steps["methods"].get("baselines", True) and steps["baselines"]["models"] == "standard"
    assert steps["baselines"]["sizes"] == [2**i for i in range(9)]  # the heads' sizes, 1..256
    assert steps["export_model"] is False and heads["export_model"] is False


def test_linear_lr_scaling_rule():
    assert linear_lr(1.7, 4096, 512, 8) == pytest.approx(1.7)
    assert linear_lr(1.7, 4096, 512, 2, 2) == pytest.approx(0.85)
    from mrl.errors import MRLError

    with pytest.raises(MRLError, match=r"trainer\.devices"):
        linear_lr(1.7, 4096, 512, -1)


def test_cyclic_schedule_is_triangular():
    """FFCV's cyclic schedule: 0 -> peak at the warmup epoch -> 0 at the end, linear in between."""
    import torch
    from hydra.utils import instantiate

    cfg = _compose("sched=cyclic", "paths.output_dir=/tmp/j")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, _ = instantiate(cfg.sched)(opt, num_epochs=10, updates_per_epoch=10, step_on_epochs=False)
    lrs = []
    for step in range(101):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.0, abs=1e-9)
    assert lrs[10] == pytest.approx(0.5)
    assert lrs[20] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert lrs[100] == pytest.approx(0.0, abs=1e-9)
    assert all(a <= b for a, b in pairwise(lrs[:21])) and all(a >= b for a, b in pairwise(lrs[20:]))


def _keys_synthetic_lacks(recipe: str) -> list[str]:
    """The recipe's data settings that only its real data set knows (limit_train, augment, ...):
    the synthetic stand-in would reject them, so the few-step run drops them."""
    synthetic = set(OmegaConf.load(Path(config_dir()) / "data" / "synthetic.yaml"))
    composed = _compose(f"experiment={recipe}", "data=synthetic")
    return sorted(set(composed.data) - synthetic)


def _few_step_args(recipe: str, tmp_path: Path) -> list[str]:
    classes, chans, pixels = _shape(recipe)
    args = [f"experiment={recipe}", "data=synthetic", *FEW_STEPS]
    args += [f"data.num_classes={classes}", f"data.in_chans={chans}", f"data.img_size={pixels}"]
    if recipe == "fashion_mnist_compare":
        # one job of the sweep, with its evaluation
        args += ["hydra.mode=RUN", "head={kind:ff,dim:4}", "evaluate.baselines.max_train=8"]
        args += ["+evaluate.retrieval.ks=[2]", "+evaluate.knn.k=2"]  # 8 database items
    if recipe == "fashion_mnist_contrastive":
        # one contrastive job of the sweep, with its evaluation
        args += ["hydra.mode=RUN", "objective=supcon", "+evaluate.retrieval.ks=[2]", "+evaluate.knn.k=2"]
    if recipe == "fashion_mnist_seeds":
        args += ["hydra.mode=RUN", "head={kind:ff,dim:1}"]  # one job of the sweep (no evaluation)
    if recipe == "fashion_mnist_relu_baselines":
        # one job of the sweep: MRL nested on the un-projected pooled ReLU features, with its evaluation
        args += ["hydra.mode=RUN", "head={kind:mrl}", "backbone.embed_dim=null"]
        args += ["+evaluate.retrieval.ks=[2]", "+evaluate.knn.k=2"]  # 8 database items
    if recipe == "fashion_mnist_posthoc":
        # one head job of the sweep: CSR on the configured backbone's features, with its evaluation
        args += ["hydra.mode=RUN", "head=csr", "source=backbone"]
        args += ["+evaluate.retrieval.ks=[2]", "+evaluate.knn.k=2"]  # 8 database items
    args += [f"~data.{key}" for key in _keys_synthetic_lacks(recipe)]
    if recipe == "imagenet_r50_mrl":
        args.append("trainer.precision=bf16-mixed")  # the recipes' precision, on the CPU
    # The others keep float32 here: without native bf16 a CPU emulates its matmuls (two R50 steps take
    # 67 s instead of 23 s, two ViT-B/16 steps minutes); one R50 recipe covers the bf16 path, and the
    # recipes differ from it only in the head or the weights they start from
    if recipe == "retrofit":
        import timm
        from safetensors.torch import save_file

        weights = tmp_path / "resnet50.safetensors"
        save_file(timm.create_model("resnet50", num_classes=0).state_dict(), str(weights))
        args.append(f"backbone.pretrained_path={weights}")
        # docs/training.md's fine-tuning of the recipe: only the last stage trains, at a tenth of the lr
        args += [
            "finetune.freeze_backbone=true",
            "finetune.train_last_stages=1",
            "finetune.backbone_lr_mult=0.1",
        ]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_a_few_steps(recipe, run_main, tmp_path):
    # mrl-train's main in this process: the console script's code without a process start per recipe
    res = run_main("mrl-train", *_few_step_args(recipe, tmp_path))
    assert res.returncode == 0, res.output[-3000:]
    (job,) = res.run_dirs()
    results = read_results(job)
    cfg = OmegaConf.load(job / "resolved_config.yaml")
    sizes = [cfg.head.dim] if cfg.head.kind == "ff" else (cfg.head.nesting or [])
    for d in sizes:
        assert f"test/acc@{d}" in results
    evaluated = ("fashion_mnist_compare", "fashion_mnist_contrastive", "fashion_mnist_relu_baselines")
    if recipe in (*evaluated, "fashion_mnist_posthoc"):
        assert len(find_evaluations(job)) == 1
    if recipe == "fashion_mnist_seeds":
        assert not find_evaluations(job)  # the claim needs only the trained heads' top-1
