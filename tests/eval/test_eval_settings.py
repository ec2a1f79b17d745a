"""Every evaluator setting comes from conf/eval.yaml: the evaluators pass each one on, and no function
they call has a default that could stand in for a forgotten setting."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections import defaultdict

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mrl.config_path import config_dir
from mrl.eval import context, evaluators, robustness
from support import tiny_eval_context as _context

EVALUATOR_MODULES = tuple(
    importlib.import_module(f"mrl.eval.{name}")
    for name in (
        "adaptive_classification",
        "adaptive_retrieval",
        "baseline_knn",
        "baselines",
        "context",
        "embeddings",
        "evaluators",
        "knn",
        "linear",
        "prefix_search",
        "quantized",
        "retrieval",
        "robustness",
        "sparse_eval",
    )
)
# Parameters with a default that is no setting of conf/eval.yaml: optional inputs and what the caller may
# already have computed
NOT_SETTINGS = {
    "baselines.pca_fit.chunk",  # None: blocks of knn.CHUNK_BYTES
    "baselines.pca_project.chunk",
    "baselines.posthoc_baselines.pca",
    "baseline_knn.posthoc_one_nn.pca",
    "knn.exact_search.transform",
    # where it runs, and its working memory by device (chunks.* cap the rows, passed by the context)
    "prefix_search.search_all_sizes.device",
    "prefix_search.search_all_sizes.block_bytes",
    "prefix_search.search_all_sizes.chunk_bytes",
    "prefix_search.search_all_sizes.max_query_rows",
    "prefix_search.search_all_sizes.max_db_rows",
    "knn.knn_predict.num_classes",  # not needed by the vote
    "context.EvalContext.__init__.sections",  # filled as the evaluators run
    "linear.linear_accuracy.covered",  # robustness sets covering a subset of the classes
    # whether the queries are the database's items: no setting but what the evaluation found (run.py);
    # tests/eval/test_leave_one_out.py checks that every evaluator's searches receive it
    "knn.exact_search.exclude_self",
    "prefix_search.search_all_sizes.exclude_self",
    "knn.leave_self_out.first",
    "context.EvalContext.__init__.exclude_self",
    "context.EvalContext.from_config.exclude_self",
    "adaptive_retrieval.FunnelSettings.__init__.exclude_self",
    "adaptive_retrieval.exact_retrieval.exclude_self",
    "baseline_knn.posthoc_one_nn.exclude_self",
    "baselines.posthoc_baselines.held_out",
    "quantized.QuantizedSettings.__init__.exclude_self",
    "quantized.search_index.exclude_self",
    "retrieval.retrieval_metrics.exclude_self",
}

# Every evaluator setting of conf/eval.yaml, set away from its default (a value that reaches a function
# unchanged cannot have come from anywhere else)
OVERRIDES = [
    "seed=3",
    "knn.k=7",
    "retrieval.ks=[5,3]",
    "adaptive_classification.targets=[0.5,0.9]",
    "adaptive_classification.num_targets=3",
    "adaptive_classification.calibration_fraction=0.4",
    "adaptive_classification.num_splits=2",
    "adaptive_classification.grid_size=11",
    "adaptive_retrieval.funnel.shortlist_size=2",
    "adaptive_retrieval.funnel.rerank_sizes=[4,full]",
    "adaptive_retrieval.funnel.shortlists=[30,10]",
    "adaptive_retrieval.shortlist_sizes=[4]",
    "adaptive_retrieval.shortlist_k=20",
    "adaptive_retrieval.rerank_size=8",
    "adaptive_retrieval.hnsw=false",
    "adaptive_retrieval.hnsw_m=8",
    "adaptive_retrieval.hnsw_ef_search=33",
    "adaptive_retrieval.hnsw_ef_construction=17",
    "baselines.sizes=[4,8]",
    "baselines.knn=true",
    "baselines.max_train=150",
    "baselines.max_iter=20",
    "quantized.formats=[binary]",
    "quantized.k=5",
    "quantized.binary_threshold=mean",
    "chunks.query=13",
    "chunks.database=101",
    "chunks.rerank=4099",
    "chunks.head=17",
]


def _defaults(module) -> set[str]:
    """``<module>.<function>.<parameter>`` of every parameter with a default, in functions and methods
    defined in ``module``."""
    name = module.__name__.rsplit(".", 1)[1]
    found = set()
    for fname, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        functions = [(fname, obj)] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            functions = [(f"{fname}.{m}", f) for m, f in vars(obj).items() if inspect.isfunction(f)]
            functions += [
                (f"{fname}.{m}", f.__func__) for m, f in vars(obj).items() if isinstance(f, classmethod)
            ]
        for qualname, fn in functions:
            for param in inspect.signature(fn).parameters.values():
                if param.default is not inspect.Parameter.empty:
                    found.add(f"{name}.{qualname}.{param.name}")
    return found


def test_no_evaluator_function_has_a_default_of_its_own():
    found = set().union(*map(_defaults, EVALUATOR_MODULES))
    assert found == NOT_SETTINGS, f"defaults beside conf/eval.yaml's: {sorted(found - NOT_SETTINGS)}"


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unset", *overrides])


def _record(monkeypatch) -> dict[str, list[dict]]:
    """Calls of every function the evaluators call, by name, as ``{parameter: value}`` (positional and
    keyword arguments alike); each still runs."""
    calls: dict[str, list[dict]] = defaultdict(list)
    for name in (
        "linear_accuracy",
        "max_softmax_predictions",
        "search_all_sizes",
        "exact_search",
        "knn_accuracy",
        "retrieval_metrics",
        "adaptive_classification",
        "exact_retrieval",
        "adaptive_retrieval",
        "posthoc_baselines",
        "posthoc_one_nn",
        "quantized_retrieval",
    ):
        # the context's shared searches (one pass, or faiss per size: the CPU's default)
        module = context if name in ("search_all_sizes", "exact_search") else evaluators
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(inspect.signature(_real).bind(*args, **kwargs).arguments)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _evaluator_settings(cfg: DictConfig) -> set[str]:
    """Every leaf key of the sections of conf/eval.yaml that evaluators read, and ``chunks`` and ``seed``."""
    sections = {s for e in evaluators.EVALUATORS for s in e.settings} | {"chunks"}
    leaves = {"seed"}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
            else:
                leaves.add(f"{prefix}{key}")

    for section in sections:
        walk(cfg[section], f"{section}.")
    return leaves


def test_evaluators_take_every_setting_from_conf_eval_yaml(monkeypatch):
    cfg = _compose(*OVERRIDES)
    calls = _record(monkeypatch)
    done = []
    sections = evaluators.run_evaluators(_context(cfg), cfg, done.append)
    assert done == [e.name for e in evaluators.EVALUATORS]
    assert set(sections) == {"linear", "knn", "retrieval", "adaptive_classification"} | {
        "adaptive_retrieval",
        "exact_retrieval",
        "baselines",
        "quantized",
    }
    (lin,), (soft,) = calls["linear_accuracy"], calls["max_softmax_predictions"]
    (curve,), (exact,), (funnels,) = (
        calls["adaptive_classification"],
        calls["exact_retrieval"],
        calls["adaptive_retrieval"],
    )
    (probes,), (one_nn,) = calls["posthoc_baselines"], calls["posthoc_one_nn"]
    (quant,) = calls["quantized_retrieval"]
    checked = {
        # setting: (value it must have, where it went)
        "seed": [curve["seed"], probes["seed"]],
        "knn.k": [max(c["k"] for c in calls["knn_accuracy"])],
        "retrieval.ks": [c["ks"] for c in calls["retrieval_metrics"]],
        "adaptive_classification.targets": [curve["targets"]],
        "adaptive_classification.num_targets": [curve["num_targets"]],
        "adaptive_classification.calibration_fraction": [curve["calibration_fraction"]],
        "adaptive_classification.num_splits": [curve["num_splits"]],
        "adaptive_classification.grid_size": [curve["grid_size"]],
        "adaptive_retrieval.hnsw": [funnels["hnsw"]],
        "adaptive_retrieval.hnsw_m": [funnels["settings"].hnsw_m],
        "adaptive_retrieval.hnsw_ef_search": [funnels["settings"].hnsw_ef_search],
        "adaptive_retrieval.hnsw_ef_construction": [funnels["settings"].hnsw_ef_construction],
        "baselines.max_train": [probes["max_train"]],
        "baselines.max_iter": [probes["max_iter"]],
        "quantized.formats": [list(quant["settings"].formats)],
        "quantized.k": [quant["settings"].k],
        "quantized.binary_threshold": [quant["settings"].binary_threshold],
        "chunks.query": [exact["query_chunk"], one_nn["query_chunk"], funnels["settings"].query_chunk]
        + [c["max_query_rows"] for c in calls["search_all_sizes"]]
        + [c["query_chunk"] for c in calls["exact_search"]]
        + [quant["settings"].query_chunk],
        "chunks.database": [exact["db_chunk"], one_nn["db_chunk"], funnels["settings"].db_chunk]
        + [c["max_db_rows"] for c in calls["search_all_sizes"]]
        + [c["db_chunk"] for c in calls["exact_search"]]
        + [quant["settings"].db_chunk],
        "chunks.rerank": [funnels["settings"].block_floats],
        "chunks.head": [lin["chunk"], soft["chunk"]],
    }
    want = {
        "seed": 3,
        "knn.k": 7,
        "retrieval.ks": [3, 5],
        "adaptive_classification.targets": [0.5, 0.9],
        "adaptive_classification.num_targets": 3,
        "adaptive_classification.calibration_fraction": 0.4,
        "adaptive_classification.num_splits": 2,
        "adaptive_classification.grid_size": 11,
        "adaptive_retrieval.hnsw": False,
        "adaptive_retrieval.hnsw_m": 8,
        "adaptive_retrieval.hnsw_ef_search": 33,
        "adaptive_retrieval.hnsw_ef_construction": 17,
        "baselines.max_train": 150,
        "baselines.max_iter": 20,
        "quantized.formats": ["binary"],
        "quantized.k": 5,
        "quantized.binary_threshold": "mean",
        "chunks.query": 13,
        "chunks.database": 101,
        "chunks.rerank": 4099,
        "chunks.head": 17,
    }
    defaults = _compose()
    for key, values in checked.items():
        assert values and all(v == want[key] for v in values), (key, values)
        # away from the default, so the value can only have come from the config
        assert OmegaConf.select(cfg, key) != OmegaConf.select(defaults, key), key
    # the settings that choose what is measured: the funnels, the baselines' sizes and their 1-NN
    assert funnels["funnels"] == [(2, [4, 16], [30, 10]), (4, [8], [20])]
    # max(knn.k, retrieval.ks), every size searched once (faiss per size on the CPU by default), shared:
    # the baselines' slices and the quantised float32 rows rank by the kNN and retrieval stage's, and
    # only the untrained slice sizes are searched besides
    searched = [(c["d"], c["k"]) for c in calls["exact_search"]]
    assert searched == [(2, 7), (4, 7), (8, 7), (16, 7), (3, 1), (6, 1), (12, 1)]  # slices: their 1-NN
    assert not calls["search_all_sizes"]
    assert probes["svd_sizes"] == [4, 8] and probes["slice_sizes"] == [3, 4, 6, 8, 12]  # + interpolation
    assert {d: sections["baselines"]["slice_1nn"][d] for d in (4, 8)} == {
        d: sections["knn"][d]["1nn"] for d in (4, 8)
    }
    # the quantised rows at every reported size; float32 from the kNN and retrieval stage's search
    assert quant["sizes"] == [2, 4, 8, 16] and set(sections["quantized"]) == {"float32", "binary"}
    assert {
        d: {k: v for k, v in row.items() if k != "bytes"}
        for d, row in sections["quantized"]["float32"].items()
    } == {
        d: {"map@5": sections["retrieval"][d]["map@5"], "1nn": sections["knn"][d]["1nn"]}
        for d in (2, 4, 8, 16)
    }
    decided = {
        "adaptive_retrieval.funnel.shortlist_size",
        "adaptive_retrieval.funnel.rerank_sizes",
        "adaptive_retrieval.funnel.shortlists",
        "adaptive_retrieval.shortlist_sizes",
        "adaptive_retrieval.shortlist_k",
        "adaptive_retrieval.rerank_size",
        "baselines.sizes",
        "baselines.svd",
        "baselines.interpolation",
        "baselines.knn",
        "baselines.models",
        "robustness.restrict",  # judged in test_robustness_settings_reach_the_sets
        "robustness.folders",
    }
    # a new setting of an evaluator's section must be added to one of the two lists above
    assert _evaluator_settings(cfg) == set(checked) | decided


@pytest.mark.parametrize(
    ("overrides", "kind", "expect"),
    [
        (
            ["baselines.svd=false", "baselines.interpolation=false", "baselines.knn=auto"],
            "mrl",
            ([], [2, 4, 8, 16]),
        ),
        (["baselines.models=standard"], "mrl", None),
        (["baselines.models=standard", "baselines.knn=auto"], "standard", ([2, 4, 8, 16], [2, 4, 8, 16])),
    ],
)
def test_baselines_settings_choose_what_is_measured(monkeypatch, overrides, kind, expect):
    cfg = _compose("methods.adaptive_retrieval=false", "baselines.max_iter=20", *overrides)
    calls = _record(monkeypatch)
    sections = evaluators.run_evaluators(_context(cfg, kind), cfg, lambda name: None)
    if expect is None:  # models=standard: a Matryoshka model gets no baselines
        assert sections["baselines"] == {} and not calls["posthoc_baselines"]
        return
    (probes,) = calls["posthoc_baselines"]
    assert (probes["svd_sizes"], probes["slice_sizes"]) == expect
    # knn=auto: the reductions' 1-NN for a standard model only
    assert len(calls["posthoc_one_nn"]) == (kind == "standard")


def test_evaluators_of_methods_that_are_off_do_not_run(monkeypatch):
    off = [f"methods.{m}=false" for m in ("linear", "knn", "adaptive_classification", "adaptive_retrieval")]
    cfg = _compose(*off, "methods.baselines=false", "methods.quantized=false")
    calls = _record(monkeypatch)
    done = []
    sections = evaluators.run_evaluators(_context(cfg), cfg, done.append)
    assert done == [e.name for e in evaluators.EVALUATORS]  # every stage is timed, run or not
    # retrieval alone: the kNN stage searches but reports no kNN accuracy
    assert set(sections) == {"knn", "retrieval"} and sections["knn"] == {} and len(sections["retrieval"]) == 4
    assert set(calls) == {"exact_search", "retrieval_metrics"}  # the CPU's per-size search


def test_an_evaluator_sees_only_its_own_sections(monkeypatch):
    seen = {}

    def recorder(name):
        return lambda ctx, settings: seen.setdefault(name, set(settings)) and {}

    recording = tuple(dataclasses.replace(e, run=recorder(e.name)) for e in evaluators.EVALUATORS)
    monkeypatch.setattr(evaluators, "EVALUATORS", recording)
    cfg = _compose()
    evaluators.run_evaluators(_context(cfg), cfg, lambda name: None)
    assert seen == {e.name: set(e.settings) for e in recording}
    assert seen["knn+retrieval"] == {"knn", "retrieval"} and seen["linear"] == set()


def test_robustness_settings_reach_the_sets(tiny_image_tree, tmp_path):
    """``robustness.restrict`` / ``robustness.folders`` and each set's own ``root``, ``restrict`` and
    ``folders`` (conf/eval.yaml) reach the sets ``mrl-eval`` evaluates (the robustness evaluator passes
    its ``robustness`` section to ``open_sets``)."""
    from hydra.utils import instantiate

    val, numbered = tiny_image_tree / "val", tmp_path / "numbered"
    numbered.mkdir()
    for label in range(4):
        (numbered / str(label)).symlink_to(val / f"class_{label:04d}")
    cfg = _compose(
        "robustness.restrict=false",
        "robustness.folders=indices",
        f"+robustness.sets.a={numbered}",
        f"+robustness.sets.b={{root:{val},restrict:true,folders:names}}",
    )
    defaults = _compose().robustness
    assert (defaults.restrict, defaults.folders, dict(defaults.sets)) == (True, "names", {})
    target = "mrl.data.image_folder.ImageFolderDataModule"
    datamodule = instantiate({"_target_": target, "root": str(tiny_image_tree), "num_workers": 0})
    a, b = robustness.open_sets(OmegaConf.to_container(cfg.robustness), datamodule)
    assert (a.name, a.root, a.restrict, a.covered) == ("a", numbered, False, (0, 1, 2, 3))
    assert (b.name, b.root, b.restrict, b.covered) == ("b", val, True, (0, 1, 2, 3))
    assert [t for _, t in a.listing.samples] == [t for _, t in b.listing.samples]
