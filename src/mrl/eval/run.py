"""The evaluation job: checkpoint -> exported embeddings -> every evaluator -> report (Hydra-free)."""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mrl.errors import MRLError
from mrl.eval.checks import check_eval_config
from mrl.eval.context import EmbeddedSet, EvalContext, QuerySet, same_items
from mrl.eval.embeddings import export_loader, export_split
from mrl.eval.evaluators import open_query_sets, run_evaluators
from mrl.eval.locations import (
    checkpoint_id,
    checkpoint_record,
    claim_output_dir,
    evaluation_settings,
    link_to_training_run,
    record_evaluation,
)
from mrl.eval.model import fingerprint, load_for_eval
from mrl.eval.neighbour_counts import check_neighbours
from mrl.eval.plots import write_plots
from mrl.eval.report_file import build_report, write_report
from mrl.eval.summary import summary_text
from mrl.eval.wandb_tables import log_report
from mrl.training.checkpoints import require_checkpoint_file

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


class StageClock:
    """Seconds of each stage (since the previous one ended), for the log and the summary's last line."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now
        return self.seconds[name]

    def lap(self, name: str) -> None:
        log.info("%s done in %.1fs", name, self.mark(name))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every enabled evaluator on ``cfg.ckpt_path``; write report.json, plots, W&B; return the report."""
    out_dir = Path(cfg.paths.output_dir)
    require_checkpoint_file(cfg.ckpt_path)
    settings = OmegaConf.to_container(cfg, resolve=True)
    check_eval_config(settings)  # before any work (the commands' pre-flight; also for direct callers)
    ckpt_id = checkpoint_id(cfg.ckpt_path)
    record = checkpoint_record(cfg.ckpt_path, ckpt_id, evaluation_settings(cfg))
    claim_output_dir(out_dir, record)  # refuses another checkpoint's (or settings') results first
    OmegaConf.save(cfg, out_dir / "eval_config.yaml")
    cfg = OmegaConf.create(settings)  # resolved: an evaluator's sections are read apart from the rest
    _seed_and_threads(cfg)
    clock = StageClock()
    ctx, train_cfg = _context(cfg, out_dir)
    log.info(
        "embeddings ready after %.1fs: database %s, queries %s",
        clock.mark("embeddings"),
        ctx.database.shape,
        ctx.queries.shape,
    )
    sections = run_evaluators(ctx, cfg, clock.lap)
    code_units = ctx.embed_dim if ctx.sparse else None  # a CSR model stores codes of this many units
    report = build_report(ctx.sizes, sections, record, code_units, _evaluated(cfg, ctx))
    write_report(report, out_dir)
    record_evaluation(out_dir, record)  # checkpoint.json says what report.json's checkpoint says
    link_to_training_run(out_dir, record)
    pngs = write_plots(report, out_dir)
    wandb_dir = _log_wandb(cfg, train_cfg, report, pngs)
    print(_summary(cfg, report, ctx, clock, pngs, wandb_dir), flush=True)
    return report


def _seed_and_threads(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
        import faiss

        faiss.omp_set_num_threads(int(cfg.threads))


def _evaluated(cfg: DictConfig, ctx: EvalContext) -> dict[str, Any]:
    """report.json's ``evaluated``: the splits the numbers come from, their sizes, and whether the
    queries were the database's own items (each then left out of its own neighbours)."""
    return {
        "database_split": str(cfg.database_split),
        "query_split": str(cfg.query_split),
        "database_items": len(ctx.database),
        "query_items": len(ctx.queries),
        "exclude_self": ctx.exclude_self,
    }


def _context(cfg: DictConfig, out_dir: Path) -> tuple[EvalContext, dict]:
    """The checkpoint's model and data, its exported embeddings (the splits' and the evaluators' query
    sets'), and the evaluators' shared context; also the training run's config."""
    data_overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else None
    module, datamodule, train_cfg = load_for_eval(cfg.ckpt_path, data_overrides, cfg.paper_head)
    requested = OmegaConf.to_container(cfg.sizes) if cfg.sizes is not None else None
    sizes = report_sizes(requested, list(module.nesting), module.head.in_features)
    device = _device(str(cfg.device))
    query_sets = open_query_sets(cfg, datamodule)  # refused here, before any embedding is computed
    # the neighbours asked for against the database's size, now that the data config is known
    check_neighbours(OmegaConf.to_container(cfg, resolve=True), train_cfg.get("data") or {})
    emb, embedded = _export_embeddings(cfg, module, datamodule, train_cfg, out_dir, device, query_sets)
    kind = (train_cfg.get("head") or {}).get("kind")
    database, queries = emb[cfg.database_split], emb[cfg.query_split]
    own = same_items(database, queries, cfg.database_split == cfg.query_split)
    if own:
        log.info(
            "The queries (%s) are the database's items (%s): each is left out of its own neighbours.",
            cfg.query_split,
            cfg.database_split,
        )
    ctx = EvalContext.from_config(cfg, database, queries, module.head, sizes, kind, device, own)
    ctx.query_sets = embedded
    return ctx, train_cfg


def _export_embeddings(
    cfg: DictConfig,
    module,
    datamodule,
    train_cfg: dict,
    out_dir: Path,
    device: torch.device,
    query_sets: dict[str, list[QuerySet]],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[EmbeddedSet]]]:
    """``{split: (embeddings, labels)}`` of the database and query splits and the query sets' embeddings
    by evaluator (each reused when already exported), in one pass of the model on ``device``; and
    ``model.safetensors`` unless ``export_model=false``. Leaves the module on the CPU."""
    ckpt_id = checkpoint_id(cfg.ckpt_path)  # the embeddings belong to the checkpoint's content (cached)
    datamodule.prepare_data()
    datamodule.setup(None)
    for split in (cfg.database_split, cfg.query_split):
        if split not in datamodule.datasets:
            raise MRLError(
                f"The data set has no '{split}' split; it has {', '.join(sorted(datamodule.datasets))}. Set "
                "database_split=<split> and query_split=<split> among those."
            )
    precision = (train_cfg.get("trainer") or {}).get("precision")
    dtype = cfg.embedding_dtype

    def identity(split: str, img_size: int) -> dict[str, Any]:
        return fingerprint(ckpt_id, train_cfg, split, dtype, img_size)

    emb = {
        split: export_split(
            module, datamodule, split, out_dir, identity(split, datamodule.img_size), dtype, device, precision
        )
        for split in dict.fromkeys([cfg.database_split, cfg.query_split])
    }
    embedded: dict[str, list[EmbeddedSet]] = {name: [] for name in query_sets}
    for evaluator, sets in query_sets.items():
        for s in sets:  # read as evaluation images, at the evaluation size
            fp = identity(f"{evaluator}:{s.name}", datamodule.eval_img_size) | s.identity
            loader, name = datamodule.loader(s.dataset), f"{evaluator}_{s.name}"
            z, labels = export_loader(
                module, datamodule, loader, len(s.dataset), name, out_dir, fp, dtype, device, precision
            )
            embedded[evaluator].append(EmbeddedSet(s, z, labels))
    module.cpu()
    if cfg.export_model:  # the one-file deployable model (mrl.load), see mrl.deploy
        from mrl.deploy import MatryoshkaModel

        MatryoshkaModel.from_module(module, datamodule).save(out_dir / "model.safetensors")
    return emb, embedded


def _summary(
    cfg: DictConfig,
    report: dict[str, Any],
    ctx: EvalContext,
    clock: StageClock,
    pngs: list[Path],
    wandb_dir: Path | None,
) -> str:
    """What ``mrl-eval`` prints at the end: the numbers, the stage timings and where everything went."""
    elapsed = time.perf_counter() - clock.started
    out_dir = Path(cfg.paths.output_dir)
    own = ", each query left out of its own neighbours" if ctx.exclude_self else ""
    lines = [
        "",
        f"Evaluation of {cfg.ckpt_path} ({len(ctx.queries)} {cfg.query_split} queries, {len(ctx.database)} "
        f"{cfg.database_split} database items{own}, {elapsed:.1f}s):",
    ]
    lines += [summary_text(report), ""]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in clock.seconds.items()))
    lines.append(f"report: {out_dir / 'report.json'}")
    lines += [f"plot:   {p}" for p in pngs]
    if wandb_dir:
        lines.append(f"W&B run: {wandb_dir}  (upload with `wandb sync {shlex.quote(str(wandb_dir))}`)")
    return "\n".join(lines)


def _log_wandb(cfg: DictConfig, train_cfg: dict, report: dict, pngs: list[Path]) -> Path | None:
    """The same tables and charts in a W&B run in the training run's group (job_type eval)."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or not node.get("_target_"):
        return None
    import wandb

    from mrl.tracking.wandb_setup import wandb_online_or_offline

    if not node.get("offline", False):
        node = wandb_online_or_offline(node)
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
