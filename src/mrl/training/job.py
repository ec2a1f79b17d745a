"""The training job: compose datamodule x backbone x Matryoshka head into Lightning, fit, test, report.

Evaluation after training (``evaluate=``) is the CLI job's next step (:mod:`mrl.cli.train`).

Hydra-free on purpose: :func:`train` takes a resolved config, so the CLI, DDP worker processes and
tests all run the same code.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from mrl.errors import MRLError
from mrl.files import write_json
from mrl.instantiate import instantiate
from mrl.preflight import check_built
from mrl.tracking.charts import plot_accuracy_vs_size
from mrl.tracking.results import RESULTS_NAME, metrics_to_floats, read_results, size_table
from mrl.tracking.wandb_setup import aggregated, build_loggers, define_metrics
from mrl.training.assemble import assemble
from mrl.training.callbacks import EpochLine, RestoreLoaderPosition, progress_bar
from mrl.training.checkpoint_io import AtomicCheckpointIO, RecordClasses
from mrl.training.checkpoints import CHECKPOINT_DIR, LAST, LoadedCheckpoint, check_compatible, load_checkpoint
from mrl.training.finetune import finetune_callbacks
from mrl.training.module import MatryoshkaLitModule

log = logging.getLogger(__name__)


def _check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise MRLError(
            f"Cannot write to the output directory {output_dir} ({err.strerror}). Choose a writable place "
            "with paths.log_dir=<dir> (or hydra.run.dir=<dir>) before training starts."
        ) from err


@dataclass(frozen=True)
class TrainResult:
    """What a training job produced: its final metrics (as in results.json) and the checkpoint they
    describe (the one the test used: the best, else the last; None when no checkpoint was written)."""

    metrics: dict[str, float]
    checkpoint: Path | None
    is_global_zero: bool


# Lightning sets this at import, so that asking whether CUDA is there does not initialise it before a fork
NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def plain_cuda_check_without_gpus() -> None:
    """On a host without a CUDA GPU, turn off the NVML-based CUDA check Lightning turned on.

    torch caches its answer only once CUDA is initialised, which on such a host never happens: every
    check loads NVML again, and torch's optimizers check at every ``step``, which shows on a small
    model's step (benchmarks/README.md, "Post-hoc heads"). Without a GPU there is nothing a fork could
    inherit, so the plain check is as safe, and cheap.
    """
    if os.environ.get(NVML_CUDA_CHECK) == "1" and not torch.cuda.is_available():
        os.environ[NVML_CUDA_CHECK] = "0"


def train(cfg: DictConfig, chosen: LoadedCheckpoint | None = None) -> TrainResult:
    """Fit (and test) the model ``cfg`` describes; write results.json, the plot and the W&B summary.

    ``chosen``: the checkpoint ``cfg.ckpt_path`` names, already read (``resume=`` picks it by reading
    it); training goes on from it without reading the file again.
    """
    output_dir = Path(cfg.paths.output_dir)
    _check_output_dir(output_dir)
    L.seed_everything(cfg.seed, workers=True)
    plain_cuda_check_without_gpus()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
        # Lightning's CPU DDP sets the threads of a process that finds no OMP_NUM_THREADS to the cores
        # over the processes on its node, over what was asked (and what its own workers inherit)
        os.environ["OMP_NUM_THREADS"] = str(int(cfg.threads))

    if cfg.get("source"):
        from mrl.training.posthoc import assemble_posthoc

        module, datamodule = assemble_posthoc(cfg)
    else:
        module, datamodule = assemble(cfg)
    check_built(cfg, module.nesting, module.has_top5)  # metric and size names, now that sizes are known
    datamodule.prepare_data()
    previous_results = read_results(output_dir) if cfg.get("resume") else {}
    ckpt_path = cfg.get("ckpt_path")
    preloaded = None
    if ckpt_path:
        # Read (safely) and checked here, before training starts, so a wrong file gets a clear message;
        # Lightning then restores the training state from these contents (AtomicCheckpointIO).
        contents = chosen.take(ckpt_path) if chosen is not None else None
        if contents is None:
            contents = load_checkpoint(ckpt_path)
        check_compatible(contents, module, ckpt_path, module.config, datamodule.classes)
        preloaded = LoadedCheckpoint(Path(ckpt_path), contents)
        del contents  # held by `preloaded` until Lightning takes it

    loggers = build_loggers(cfg)  # W&B starts lazily, at log_hyperparams below
    extra = [*finetune_callbacks(cfg, module.backbone), RecordClasses(datamodule.classes)]
    trainer = _build_trainer(cfg, loggers, preloaded, extra)
    for logger in loggers:
        logger.log_hyperparams(module.config)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            define_metrics(logger.experiment, module.nesting, depth_stages(module))
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except FloatingPointError as err:
            raise MRLError(f"{err} (checkpoints: {output_dir / CHECKPOINT_DIR})") from None
        _check_trained(cfg, trainer)
        # A resumed run adds to its results, never drops them: a run resumed after it had finished
        # trains no more and logs only the test metrics again.
        results = {**previous_results, **metrics_to_floats(trainer.callback_metrics)}
        best = _best_checkpoint(trainer, output_dir)
        if cfg.get("test", True):
            trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
            results.update(metrics_to_floats(trainer.callback_metrics))
        if trainer.is_global_zero:
            _report(results, module.nesting, output_dir, loggers, depth_stages(module))
    finally:
        if trainer.is_global_zero and any(isinstance(x, WandbLogger) for x in loggers):
            import wandb

            if wandb.run is not None:  # each job of a multirun gets its own W&B run
                wandb.finish()
    last = output_dir / CHECKPOINT_DIR / LAST
    tested = Path(best) if best else (last if last.is_file() else None)
    return TrainResult(results, tested, trainer.is_global_zero)


def _build_trainer(
    cfg: DictConfig,
    loggers: list[Logger],
    preloaded: LoadedCheckpoint | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> L.Trainer:
    """The Lightning trainer of ``cfg.trainer`` with the configured callbacks, mrl's own and
    ``extra_callbacks``; it restores ``preloaded`` without reading its file (unless ``trainer.plugins``
    replaces mrl's checkpoint IO)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and c.get("_target_")]
    callbacks += [RestoreLoaderPosition(), EpochLine(), *extra_callbacks]
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if cfg.trainer.get("enable_progress_bar", True) and not has_bar:
        callbacks.append(progress_bar(float(cfg.get("progress_bar_refresh_s", 1.0))))
    extra = {}
    if cfg.get("compile") and "inference_mode" not in cfg.trainer:
        # A compiled backbone is guarded on its input's dispatch keys: under inference_mode the sanity
        # check's batch and the later validation batches differ in them, so the evaluation graph was
        # compiled twice (TORCH_LOGS=recompiles shows them, and the compile test in
        # tests/training/test_train_cli.py counts them). no_grad evaluation keeps one eval graph.
        extra["inference_mode"] = False
    if "plugins" not in cfg.trainer:
        extra["plugins"] = [AtomicCheckpointIO(preloaded)]  # checkpoints appear only when complete
    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)
    except (InstantiationException, MisconfigurationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, MisconfigurationException):
            raise
        raise MRLError(
            f"The trainer settings do not work on this machine: {' '.join(str(cause).split())} Choose "
            "another trainer (trainer=cpu, trainer=ddp_cpu) or fix the trainer.* overrides."
        ) from None


def _check_trained(cfg: DictConfig, trainer: L.Trainer) -> None:
    """A run that took no optimizer step has no trained model: nothing to test or report."""
    if trainer.global_step == 0:
        raise MRLError(
            "The run ended without a single optimizer step, so there is no trained model to test or "
            "report; nothing was written to results.json. Give it at least one epoch with at least one "
            f"training batch (trainer.max_epochs={cfg.trainer.get('max_epochs')}; check also "
            "trainer.max_steps, trainer.limit_train_batches, and that the training split holds at "
            f"least one full batch of data.batch_size={cfg.data.get('batch_size')}: the last "
            "incomplete batch is dropped)."
        )


def _best_checkpoint(trainer: L.Trainer, output_dir: Path) -> str | None:
    """The best checkpoint of this run (None without one): the test and ``evaluate=`` use it.

    A run resumed after its directory was moved or copied restores the old absolute path from the
    checkpoint's callback state; the file with that name in this run's checkpoint dir is the one meant.
    """
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not best:
        return None
    path = Path(best)
    if not path.is_relative_to(output_dir):
        path = output_dir / CHECKPOINT_DIR / path.name
    return str(path) if path.is_file() else None


def depth_stages(module: MatryoshkaLitModule) -> tuple[int, ...]:
    """The earlier stages with Matryoshka heads (``head.depth_stages``), none without."""
    return () if module.depth is None else tuple(module.depth.stages)


def _report(
    results: dict[str, float],
    sizes: list[int],
    output_dir: Path,
    loggers: list[Logger],
    stages: tuple[int, ...] = (),
) -> None:
    """results.json, the accuracy-vs-size PNG, W&B summary and the terminal table (rank zero only)."""
    write_json(output_dir / RESULTS_NAME, results)
    stage = "test" if any(f"test/acc@{d}" in results for d in sizes) else "val"
    png = plot_accuracy_vs_size(
        {stage: (sizes, [results.get(f"{stage}/acc@{d}", float("nan")) for d in sizes])},
        output_dir / "acc_vs_size.png",
        title=f"{stage} top-1 accuracy vs embedding size",
    )
    wandb_dir = None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            # the per-size validation metrics keep W&B's own best/last summaries (define_metrics)
            kept = aggregated(sizes, stages)
            logger.experiment.summary.update({k: v for k, v in results.items() if k not in kept})
            logger.experiment.log({"acc_vs_size_png": wandb.Image(str(png))})
            wandb_dir = logger.experiment.dir
    lines = [
        "",
        f"Per-size top-1 accuracy ({', '.join(str(d) for d in sizes)}):",
        size_table(results, sizes),
        "",
    ]
    lines.append(f"results: {output_dir / 'results.json'}")
    lines.append(f"plot:    {png}")
    if wandb_dir:
        run_dir = Path(wandb_dir).parent
        lines.append(f"W&B run: {run_dir}  (upload with `wandb sync {shlex.quote(str(run_dir))}`)")
    print("\n".join(lines), flush=True)
