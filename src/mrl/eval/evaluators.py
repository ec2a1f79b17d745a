"""The evaluators of ``mrl-eval``, in the order they run, each ``(context, settings) -> report sections``.

An evaluator reads the shared :class:`~mrl.eval.context.EvalContext` and ``settings``, the sections of
conf/eval.yaml it names (nothing else of the config reaches it), and returns its ``report.json``
section(s). Every setting comes from conf/eval.yaml: nothing here or in the functions it calls has a
default of its own. Each evaluator also names the pre-flight checks of its sections (they live beside
it, :func:`mrl.eval.checks.check_eval_config` runs them) and, where it evaluates more than the query
split, the query sets it needs embedded (opened before any embedding is computed and exported with the
splits: :func:`open_query_sets`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mrl.config_checks import Node
from mrl.errors import MRLError
from mrl.eval import robustness
from mrl.eval.adaptive_classification import adaptive_classification, check_adaptive_classification
from mrl.eval.adaptive_retrieval import (
    Funnel,
    FunnelSettings,
    adaptive_retrieval,
    check_adaptive_retrieval,
    exact_retrieval,
)
from mrl.eval.baseline_knn import posthoc_one_nn
from mrl.eval.baselines import check_baselines, interpolation_sizes, pca_fit, posthoc_baselines
from mrl.eval.context import EvalContext, QuerySet, methods_on
from mrl.eval.knn import check_knn, knn_accuracy
from mrl.eval.linear import linear_accuracy, max_softmax_predictions
from mrl.eval.progress import begin_stage
from mrl.eval.quantized import QuantizedSettings, check_quantized, quantized_retrieval
from mrl.eval.retrieval import check_retrieval, retrieval_metrics
from mrl.eval.sparse_eval import NOT_FOR_CODES, PREFIX_FORMATS_SKIPPED, sparse_quantized
from mrl.nn.nesting import default_nesting

# Funnels and exact search are reported by mAP@10 and top-1, as in the paper (report.json's row keys).
FUNNEL_K = 10
MATRYOSHKA_KINDS = ("mrl", "mrl_e")


@dataclass(frozen=True)
class Evaluator:
    """One stage of the evaluation: ``run(context, settings)`` returns its report sections."""

    name: str  # the stage in the log ("<name> done in ...") and the "seconds:" line
    # runs when any of these methods.<name> is on; none: always (its settings say what there is to do)
    methods: tuple[str, ...]
    settings: tuple[str, ...]  # the conf/eval.yaml sections it reads
    # the pre-flight checks of those sections, each (plain config, key prefix) -> raises MRLError
    checks: tuple[Callable[[Node, str], None], ...]
    run: Callable[[EvalContext, DictConfig], dict[str, Any]]
    # the query sets beyond the splits it evaluates, opened from (settings, datamodule); None: none
    query_sets: Callable[[DictConfig, Any], list[QuerySet]] | None

    def is_on(self, methods: frozenset[str]) -> bool:
        return not self.methods or bool(methods.intersection(self.methods))


def measure_linear(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``linear``: top-1 / top-5 of the trained heads at each reported size."""
    per_size = linear_accuracy(ctx.head, ctx.queries, ctx.query_labels, ctx.chunks.head)
    return {"linear": {d: per_size[d] for d in ctx.sizes}}


def measure_knn_and_retrieval(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``knn`` (1-NN, k-NN vote) and ``retrieval`` (mAP, precision, recall, hit at each k) from one
    exact search per reported size; for a CSR model also ``sparse_retrieval``, each size's sparse search
    time (:func:`mrl.eval.sparse_eval.code_search`)."""
    ks = sorted({int(k) for k in settings.retrieval.ks})
    kmax = max([*ks, int(settings.knn.k), 1])
    if kmax > ctx.candidates:
        others = " other" if ctx.exclude_self else ""
        raise MRLError(
            f"The database has {ctx.candidates}{others} items to rank for each query, fewer than the "
            f"k={kmax} asked for; lower the k values (knn.k, retrieval.ks)."
        )
    knn, retrieval = {}, {}
    for d in ctx.sizes:
        neighbor_labels = ctx.db_labels[ctx.neighbours(d, kmax)]
        if "knn" in ctx.methods:
            knn[d] = {
                "1nn": knn_accuracy(neighbor_labels, ctx.query_labels, 1, ctx.num_classes),
                "knn": knn_accuracy(neighbor_labels, ctx.query_labels, int(settings.knn.k), ctx.num_classes),
            }
        if "retrieval" in ctx.methods:
            retrieval[d] = retrieval_metrics(
                neighbor_labels, ctx.query_labels, ctx.db_labels, ks, ctx.exclude_self
            )
    timed = {d: ctx.sparse_searches[d] for d in ctx.sizes if d in ctx.sparse_searches}
    return {"knn": knn, "retrieval": retrieval} | ({"sparse_retrieval": timed} if ctx.sparse else {})


def measure_adaptive_classification(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``adaptive_classification``: the cascade's accuracy vs size curve (needs two trained sizes)."""
    if len(ctx.nesting) < 2:
        return {"adaptive_classification": []}
    pred, conf = max_softmax_predictions(ctx.head, ctx.queries, ctx.chunks.head)
    ac = settings.adaptive_classification
    curve = adaptive_classification(
        pred,
        conf,
        ctx.query_labels,
        ctx.nesting,
        targets=OmegaConf.to_container(ac.targets) if ac.targets is not None else None,
        num_targets=int(ac.num_targets),
        calibration_fraction=float(ac.calibration_fraction),
        num_splits=int(ac.num_splits),
        grid_size=int(ac.grid_size),
        seed=ctx.seed,
    )
    return {"adaptive_classification": curve}


def measure_adaptive_retrieval(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``adaptive_retrieval`` (every funnel, flat and with hnsw also HNSW shortlists) and
    ``exact_retrieval`` (full-size exact search, timed the same way)."""
    ar, chunks = settings.adaptive_retrieval, ctx.chunks
    data = (ctx.database, ctx.db_labels, ctx.queries, ctx.query_labels)
    exact = exact_retrieval(*data, FUNNEL_K, chunks.query, chunks.database, ctx.exclude_self)
    search = FunnelSettings(
        hnsw_m=int(ar.hnsw_m),
        hnsw_ef_construction=int(ar.hnsw_ef_construction),
        hnsw_ef_search=int(ar.hnsw_ef_search),
        query_chunk=chunks.query,  # batched like the exact search it is compared with
        db_chunk=chunks.database,
        block_floats=chunks.rerank,
        exclude_self=ctx.exclude_self,
    )
    funnels = funnel_configs(ar, ctx.embed_dim)
    rows = adaptive_retrieval(*data, funnels, FUNNEL_K, bool(ar.hnsw), search)
    return {"adaptive_retrieval": rows, "exact_retrieval": exact}


def measure_baselines(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``baselines``: probes on PCA/SVD and truncation to each size, and their 1-NN when asked for."""
    bc = settings.baselines
    if bc.models == "standard" and ctx.kind != "standard":
        return {"baselines": {}}
    base_sizes = _baseline_sizes(ctx, bc.sizes)
    slice_sizes = list(base_sizes)
    if bc.interpolation and ctx.kind in MATRYOSHKA_KINDS:
        slice_sizes = sorted(set(slice_sizes) | set(interpolation_sizes(ctx.nesting)))
    svd_sizes = base_sizes if bc.svd else []
    pca = pca_fit(ctx.database) if svd_sizes else None  # one pass over the database for both
    data = (ctx.database, ctx.db_labels, ctx.queries, ctx.query_labels)
    out = posthoc_baselines(
        *data, svd_sizes, slice_sizes, int(bc.max_train), int(bc.max_iter), ctx.seed, pca, ctx.exclude_self
    )
    if baselines_one_nn(bc.knn, ctx.kind):
        # a truncation's 1-NN ranks by the prefixes' shared search (the kNN stage's at a reported size)
        chunks = (ctx.chunks.query, ctx.chunks.database)
        out |= posthoc_one_nn(*data, svd_sizes, slice_sizes, *chunks, ctx.neighbours, pca, ctx.exclude_self)
    return {"baselines": out}


def measure_quantized(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``quantized``: bytes per vector, mAP@k and 1-NN of every size stored as float32, int8, binary; a
    CSR model's codes stored with float32 and float16 values (int8 and binary are prefix formats)."""
    q = settings.quantized
    if ctx.sparse:
        if q.formats:
            ctx.skip("quantized.formats", PREFIX_FORMATS_SKIPPED)
        data = (ctx.database_codes(max(ctx.sizes)), ctx.db_labels, ctx.queries, ctx.query_labels)
        chunks = (ctx.chunks.query, ctx.chunks.database)
        found = sparse_quantized(
            *data, ctx.sizes, int(q.k), chunks, ctx.neighbours, ctx.exclude_self, ctx.device
        )
        return {"quantized": found}
    qs = QuantizedSettings(
        formats=tuple(q.formats),
        k=int(q.k),
        binary_threshold=str(q.binary_threshold),
        query_chunk=ctx.chunks.query,
        db_chunk=ctx.chunks.database,
        exclude_self=ctx.exclude_self,
    )
    # the float32 rows rank by the prefixes' shared search (the knn+retrieval stage's)
    data = (ctx.database, ctx.db_labels, ctx.queries, ctx.query_labels)
    return {"quantized": quantized_retrieval(*data, ctx.sizes, qs, ctx.neighbours)}


def measure_robustness(ctx: EvalContext, settings: DictConfig) -> dict[str, Any]:
    """``robustness``: the linear top-1 of every robustness set (its query sets) at each reported size."""
    sets = ctx.query_sets.get("robustness")
    if not sets:
        return {}
    return {"robustness": robustness.robustness_section(ctx.head, sets, ctx.sizes, ctx.chunks.head)}


def _baseline_sizes(ctx: EvalContext, sizes: Any) -> list[int]:
    """``baselines.sizes``, else the reported sizes, else (a one-size model) the paper's powers of two."""
    if sizes is not None:
        return sorted({int(d) for d in sizes if int(d) <= ctx.embed_dim})
    if len(ctx.nesting) > 1:
        return list(ctx.sizes)
    return default_nesting(ctx.embed_dim, 8)  # 8, 16, ..., D


EVALUATORS: tuple[Evaluator, ...] = (
    Evaluator("linear", ("linear",), (), (), measure_linear, None),
    Evaluator(
        "knn+retrieval",
        ("knn", "retrieval"),
        ("knn", "retrieval"),
        (check_knn, check_retrieval),
        measure_knn_and_retrieval,
        None,
    ),
    Evaluator(
        "adaptive_classification",
        ("adaptive_classification",),
        ("adaptive_classification",),
        (check_adaptive_classification,),
        measure_adaptive_classification,
        None,
    ),
    Evaluator(
        "adaptive_retrieval",
        ("adaptive_retrieval",),
        ("adaptive_retrieval",),
        (check_adaptive_retrieval,),
        measure_adaptive_retrieval,
        None,
    ),
    # after knn+retrieval: the searches it shares through the context are already there
    Evaluator("baselines", ("baselines",), ("baselines",), (check_baselines,), measure_baselines, None),
    Evaluator("quantized", ("quantized",), ("quantized",), (check_quantized,), measure_quantized, None),
    # no method switch: it evaluates the sets robustness.sets names (none by default)
    Evaluator(
        "robustness",
        (),
        ("robustness",),
        (robustness.check_robustness,),
        measure_robustness,
        robustness.query_sets,
    ),
)


def _settings(cfg: DictConfig, evaluator: Evaluator) -> DictConfig:
    return OmegaConf.masked_copy(cfg, list(evaluator.settings))


def open_query_sets(cfg: DictConfig, datamodule) -> dict[str, list[QuerySet]]:
    """The query sets beyond the splits that the evaluators that are on need embedded, by evaluator,
    each opened from its own sections of ``cfg`` (every refusal of a set comes here, before any
    embedding is computed)."""
    methods = methods_on(cfg)
    return {
        e.name: e.query_sets(_settings(cfg, e), datamodule)
        for e in EVALUATORS
        if e.query_sets is not None and e.is_on(methods)
    }


def run_evaluators(ctx: EvalContext, cfg: DictConfig, done: Callable[[str], None]) -> dict[str, Any]:
    """Run every evaluator whose method is on, in order, each with its own sections of ``cfg``; call
    ``done(name)`` after each stage (also a skipped one, so the stage timings keep every name). One that
    does not apply to a CSR model's sparse codes is skipped with its reason (``ctx.skip``). Returns the
    report sections (``ctx.sections``)."""
    for evaluator in EVALUATORS:
        begin_stage(evaluator.name)  # its searches are counted from here (their progress lines)
        if evaluator.is_on(ctx.methods):
            reason = NOT_FOR_CODES.get(evaluator.name) if ctx.sparse else None
            if reason:
                ctx.skip(evaluator.name, reason)
            else:
                ctx.sections.update(evaluator.run(ctx, _settings(cfg, evaluator)))
        done(evaluator.name)
    return ctx.sections


def _full(value: Any, embed_dim: int) -> int:
    return embed_dim if str(value) == "full" else int(value)


def funnel_configs(ar: DictConfig, embed_dim: int) -> list[Funnel]:
    """The funnels to measure (``adaptive_retrieval`` settings): the configured (paper) funnel and
    one-stage adaptive retrieval per D_s."""
    funnels = []
    f = ar.funnel
    if f:
        pairs = [(_full(d, embed_dim), int(k)) for d, k in zip(f.rerank_sizes, f.shortlists, strict=True)]
        # Sizes above this model's embedding size are dropped (a 512-d model has no 2048 stage).
        pairs = [(d, k) for d, k in pairs if d <= embed_dim]
        ds = int(f.shortlist_size)
        if pairs and ds <= embed_dim:
            funnels.append((ds, [d for d, _ in pairs], [k for _, k in pairs]))
    rerank = _full(ar.rerank_size, embed_dim)
    for ds in ar.shortlist_sizes or []:
        if int(ds) < rerank <= embed_dim:
            funnels.append((int(ds), [rerank], [int(ar.shortlist_k)]))
    return funnels


def baselines_one_nn(setting: bool | str, kind: str | None) -> bool:
    """Whether to measure the 1-NN of the post-hoc reductions (``baselines.knn``: true, false, auto)."""
    if setting == "auto":
        # A standard model's reductions are the paper's baselines (the comparison table's 1-NN column);
        # a Matryoshka model's own prefixes already have their 1-NN from the kNN stage, and the 1-NN of
        # its PCA and untrained sizes would cost more exact searches than everything else together.
        return kind not in MATRYOSHKA_KINDS
    return bool(setting)
