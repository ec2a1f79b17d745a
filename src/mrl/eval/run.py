"""The evaluation job: checkpoint -> exported embeddings -> every evaluator -> report (Hydra-free)."""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mrl.checkpoints import require_checkpoint_file
from mrl.errors import MRLError
from mrl.eval import adaptive_classification as adaptive_cls
from mrl.eval import adaptive_retrieval as adaptive_ret
from mrl.eval import baselines as posthoc
from mrl.eval import knn as knn_eval
from mrl.eval import linear as linear_eval
from mrl.eval.baseline_knn import posthoc_one_nn
from mrl.eval.embeddings import export_split
from mrl.eval.locations import checkpoint_id, checkpoint_record, claim_output_dir, link_to_training_run
from mrl.eval.model import fingerprint, load_for_eval
from mrl.eval.plots import write_plots
from mrl.eval.report_file import build_report, write_report
from mrl.eval.retrieval import retrieval_metrics
from mrl.eval.summary import summary_text
from mrl.eval.wandb_tables import log_report
from mrl.nn.nesting import default_nesting

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MRLError(f"device={name} but no CUDA GPU is available here; use device=cpu or device=auto.")
    return torch.device(name)


def report_sizes(requested: list[int] | None, nesting: list[int], embed_dim: int) -> list[int]:
    """The sizes to report: the nesting, or the requested ones, each of which must be a trained size."""
    if requested is None:
        return list(nesting)
    try:
        sizes = sorted({int(d) for d in requested})
    except (TypeError, ValueError):
        raise MRLError(f"sizes must be a list of integers, got {requested!r}.") from None
    bad = [d for d in sizes if d not in nesting]
    if bad or not sizes:
        too_large = [d for d in bad if d > embed_dim]
        detail = f" ({too_large} exceed the embedding size {embed_dim})" if too_large else ""
        raise MRLError(
            f"sizes={requested} includes sizes the model was not trained at: {bad}{detail}. Choose among "
            f"its nesting {nesting} (or sizes=null for all of them)."
        )
    return sizes


def _full(value: Any, embed_dim: int) -> int:
    return embed_dim if str(value) == "full" else int(value)


def funnel_configs(cfg: DictConfig, embed_dim: int) -> list[tuple[int, list[int], list[int]]]:
    """The funnels to measure: the configured (paper) funnel and one-stage adaptive retrieval per D_s."""
    funnels = []
    f = cfg.funnel
    if f:
        pairs = [(_full(d, embed_dim), int(k)) for d, k in zip(f.rerank_sizes, f.shortlists, strict=True)]
        # Sizes above this model's embedding size are dropped (a 512-d model has no 2048 stage).
        pairs = [(d, k) for d, k in pairs if d <= embed_dim]
        ds = int(f.shortlist_size)
        if pairs and ds <= embed_dim:
            funnels.append((ds, [d for d, _ in pairs], [k for _, k in pairs]))
    rerank = _full(cfg.rerank_size, embed_dim)
    for ds in cfg.shortlist_sizes or []:
        if int(ds) < rerank <= embed_dim:
            funnels.append((int(ds), [rerank], [int(cfg.shortlist_k)]))
    return funnels


def _one_nn_baselines(bc: DictConfig, kind: str | None) -> bool:
    """Whether to measure the 1-NN of the post-hoc reductions (``baselines.knn``), after checking the
    baselines' options."""
    if bc.get("models", "all") not in ("all", "standard"):
        raise MRLError(f"baselines.models must be all or standard, got {bc.models!r}.")
    one_nn = bc.get("knn", "auto")
    if one_nn not in (True, False, "auto"):
        raise MRLError(f"baselines.knn must be true, false or auto, got {one_nn!r}.")
    if one_nn == "auto":
        # A standard model's reductions are the paper's baselines (the comparison table's 1-NN column);
        # a Matryoshka model's own prefixes already have their 1-NN from the kNN stage, and the 1-NN of
        # its PCA and untrained sizes would cost more exact searches than everything else together.
        return kind not in ("mrl", "mrl_e")
    return bool(one_nn)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every enabled evaluator on ``cfg.ckpt_path``; write report.json, plots, W&B; return the report."""
    out_dir = Path(cfg.paths.output_dir)
    require_checkpoint_file(cfg.ckpt_path)
    ckpt_id = checkpoint_id(cfg.ckpt_path)
    claim_output_dir(out_dir, cfg.ckpt_path, ckpt_id)  # refuses another checkpoint's results first
    OmegaConf.save(cfg, out_dir / "eval_config.yaml")
    torch.manual_seed(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
        import faiss

        faiss.omp_set_num_threads(int(cfg.threads))
    started = time.perf_counter()
    data_overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None
    module, datamodule, train_cfg = load_for_eval(cfg.ckpt_path, data_overrides)
    nesting, head = list(module.nesting), module.head
    embed_dim = head.in_features
    sizes = report_sizes(
        OmegaConf.to_container(cfg.sizes) if cfg.sizes is not None else None, nesting, embed_dim
    )
    if cfg.embedding_dtype not in ("float32", "float16"):
        raise MRLError(f"embedding_dtype must be float32 or float16, got {cfg.embedding_dtype}.")
    kind = (train_cfg.get("head") or {}).get("kind")
    one_nn = _one_nn_baselines(cfg.baselines, kind)  # the baselines' options, checked before any work

    datamodule.prepare_data()
    datamodule.setup(None)
    for split in (cfg.database_split, cfg.query_split):
        if split not in datamodule.datasets:
            raise MRLError(
                f"The data set has no '{split}' split; it has {', '.join(sorted(datamodule.datasets))}. Set "
                "database_split=<split> and query_split=<split> among those."
            )
    device = _device(str(cfg.device))
    precision = (train_cfg.get("trainer") or {}).get("precision")
    emb = {}
    for split in dict.fromkeys([cfg.database_split, cfg.query_split]):
        fp = fingerprint(cfg.ckpt_path, train_cfg, split, cfg.embedding_dtype, datamodule.img_size)
        emb[split] = export_split(
            module, datamodule, split, out_dir, fp, cfg.embedding_dtype, device, precision
        )
    module.cpu()
    if cfg.get("export_model", True):  # the one-file deployable model (mrl.load), see mrl.deploy
        from mrl.deploy import MatryoshkaModel

        MatryoshkaModel.from_module(module, datamodule).save(out_dir / "model.safetensors")
    db, db_y = emb[cfg.database_split]
    q, q_y = emb[cfg.query_split]
    num_classes = head.num_classes
    methods = cfg.methods
    chunks = cfg.chunks
    log.info(
        "embeddings ready after %.1fs: database %s, queries %s",
        time.perf_counter() - started,
        db.shape,
        q.shape,
    )

    timings: dict[str, float] = {"embeddings": time.perf_counter() - started}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now
        log.info("%s done in %.1fs", name, timings[name])

    linear = {}
    if methods.linear:
        per_size = linear_eval.linear_accuracy(head, q, q_y, chunks.head)
        linear = {d: per_size[d] for d in sizes}
    lap("linear")

    knn, retrieval = {}, {}
    if methods.knn or methods.retrieval:
        ks = sorted({int(k) for k in cfg.retrieval.ks})
        kmax = max([*ks, int(cfg.knn.k), 1])
        if kmax > len(db):
            raise MRLError(
                f"The database has {len(db)} items, fewer than the k={kmax} asked for; lower the k values."
            )
        use_gpu = None if device.type == "cuda" else False  # None: a GPU index when faiss has GPUs
        for d in sizes:
            _, ids = knn_eval.exact_search(db, q, d, kmax, chunks.query, chunks.database, use_gpu)
            neighbor_labels = db_y[ids]
            if methods.knn:
                knn[d] = {
                    "1nn": knn_eval.knn_accuracy(neighbor_labels, q_y, 1, num_classes),
                    "knn": knn_eval.knn_accuracy(neighbor_labels, q_y, int(cfg.knn.k), num_classes),
                }
            if methods.retrieval:
                retrieval[d] = retrieval_metrics(neighbor_labels, q_y, db_y, ks)
    lap("knn+retrieval")

    adaptive_classification = []
    if methods.adaptive_classification and len(nesting) > 1:
        pred, conf = linear_eval.max_softmax_predictions(head, q, chunks.head)
        ac = cfg.adaptive_classification
        adaptive_classification = adaptive_cls.adaptive_classification(
            pred,
            conf,
            q_y,
            nesting,
            targets=OmegaConf.to_container(ac.targets) if ac.targets is not None else None,
            num_targets=int(ac.num_targets),
            calibration_fraction=float(ac.calibration_fraction),
            num_splits=int(ac.num_splits),
            grid_size=int(ac.grid_size),
            seed=int(cfg.seed),
        )
    lap("adaptive_classification")

    adaptive_retrieval, exact = [], {}
    if methods.adaptive_retrieval:
        ar = cfg.adaptive_retrieval
        exact = adaptive_ret.exact_retrieval(
            db, db_y, q, q_y, k=10, query_chunk=chunks.query, db_chunk=chunks.database
        )
        settings = adaptive_ret.FunnelSettings(
            hnsw_m=int(ar.hnsw_m),
            hnsw_ef_construction=int(ar.hnsw_ef_construction),
            hnsw_ef_search=int(ar.hnsw_ef_search),
            query_chunk=chunks.query,  # batched like the exact search it is compared with
            db_chunk=chunks.database,
            block_floats=int(chunks.rerank),
        )
        adaptive_retrieval = adaptive_ret.adaptive_retrieval(
            db, db_y, q, q_y, funnel_configs(ar, embed_dim), 10, bool(ar.hnsw), settings
        )
    lap("adaptive_retrieval")

    baselines: dict[str, dict[int, float]] = {}
    bc = cfg.baselines
    if methods.baselines and (bc.get("models", "all") == "all" or kind == "standard"):
        if bc.sizes is not None:
            base_sizes = sorted({int(d) for d in bc.sizes if int(d) <= embed_dim})
        elif len(nesting) > 1:
            base_sizes = sizes
        else:  # a standard model: the paper's powers of two
            base_sizes = default_nesting(embed_dim, 8)
        slice_sizes = list(base_sizes)
        if bc.interpolation and kind in ("mrl", "mrl_e"):
            slice_sizes = sorted(set(slice_sizes) | set(posthoc.interpolation_sizes(nesting)))
        svd_sizes = base_sizes if bc.svd else []
        pca = posthoc.pca_fit(db) if svd_sizes else None  # one pass over the database for both
        baselines = posthoc.posthoc_baselines(
            db, db_y, q, q_y, svd_sizes, slice_sizes, bc.max_train, bc.max_iter, cfg.seed, pca=pca
        )
        if one_nn:
            baselines |= posthoc_one_nn(
                db,
                db_y,
                q,
                q_y,
                svd_sizes,
                slice_sizes,
                chunks.query,
                chunks.database,
                pca=pca,
                # a truncation's 1-NN at a reported size is the kNN stage's 1-NN: the same search
                known_slice_1nn={d: v["1nn"] for d, v in knn.items()},
            )
    lap("baselines")

    sections = {
        "linear": linear,
        "knn": knn,
        "retrieval": retrieval,
        "adaptive_classification": adaptive_classification,
        "adaptive_retrieval": adaptive_retrieval,
        "exact_retrieval": exact,
        "baselines": baselines,
    }
    report = build_report(sizes, sections, checkpoint_record(cfg.ckpt_path, ckpt_id))
    write_report(report, out_dir)
    link_to_training_run(out_dir, cfg.ckpt_path, ckpt_id)
    pngs = write_plots(report, out_dir)
    wandb_dir = _log_wandb(cfg, train_cfg, report, pngs)
    elapsed = time.perf_counter() - started
    lines = [
        "",
        f"Evaluation of {cfg.ckpt_path} ({len(q)} queries, {len(db)} database items, {elapsed:.1f}s):",
    ]
    lines += [summary_text(report), ""]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    lines.append(f"report: {out_dir / 'report.json'}")
    lines += [f"plot:   {p}" for p in pngs]
    if wandb_dir:
        lines.append(f"W&B run: {wandb_dir}  (upload with `wandb sync {shlex.quote(str(wandb_dir))}`)")
    print("\n".join(lines), flush=True)
    return report


def _log_wandb(cfg: DictConfig, train_cfg: dict, report: dict, pngs: list[Path]) -> Path | None:
    """The same tables and charts in a W&B run in the training run's group (job_type eval)."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or not node.get("_target_"):
        return None
    import wandb

    from mrl.train import _wandb_online_or_offline

    if not node.get("offline", False):
        node = _wandb_online_or_offline(node)
    trained = ((train_cfg.get("logger") or {}).get("wandb") or {}) if isinstance(train_cfg, dict) else {}
    ckpt = Path(cfg.ckpt_path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    group = node.get("group") or trained.get("group") or run_dir.name
    run = wandb.init(
        project=node.get("project") or "mrl",
        group=group,
        job_type=node.get("job_type") or "eval",
        name=node.get("name") or f"eval:{run_dir.name}/{ckpt.stem}",
        tags=list(node.get("tags") or []),
        dir=str(cfg.paths.output_dir),
        mode="offline" if node.get("offline", False) else "online",
        config={"eval": OmegaConf.to_container(cfg, resolve=True), "train": train_cfg, "group": group},
        reinit="finish_previous",
    )
    try:
        log_report(run, report, pngs)
        return Path(run.dir).parent
    finally:
        wandb.finish()
