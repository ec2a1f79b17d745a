"""The training job: compose datamodule x backbone x Matryoshka head into Lightning, fit, test, report.

Hydra-free on purpose: :func:`train` takes a resolved config, so the CLI, DDP worker processes and
tests all run the same code.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from mrl.callbacks import RestoreLoaderPosition, debug_hooks, progress_bar
from mrl.checkpoint_io import AtomicCheckpointIO
from mrl.checkpoints import check_compatible, load_checkpoint
from mrl.errors import MRLError
from mrl.files import write_json
from mrl.lightning_module import MatryoshkaModule
from mrl.models.backbone import build_with_upsizing
from mrl.models.heads import build_head
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.preflight import check_built
from mrl.tracking.charts import plot_accuracy_vs_size
from mrl.tracking.results import RESULTS_NAME, metrics_to_floats, read_results, size_table

log = logging.getLogger(__name__)


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own user errors through unwrapped.

    Hydra wraps every exception raised by a target in an ``InstantiationException``; an
    :class:`MRLError` inside must reach the CLI as itself, to be printed as one clear paragraph.
    """
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err.__cause__
        while cause is not None:  # Hydra may wrap it twice (an import error locating the target)
            if isinstance(cause, MRLError):
                raise cause from None
            cause = cause.__cause__
        if isinstance(err.__cause__, MisconfigurationException):
            raise  # the trainer's own message, worded by train() below
        raise config_error(node, err) from err


def config_error(node: Any, err: InstantiationException) -> MRLError:
    """The last resort for a component that its settings fail to build (the pre-flight checks in
    :mod:`mrl.config_checks` catch the known cases first): a user error naming the config node."""
    cause = err.__cause__ or err
    key = str(getattr(node, "_get_full_key", lambda _: "")(None) or "") if OmegaConf.is_config(node) else ""
    target = node.get("_target_") if hasattr(node, "get") else None
    where = f"{key} ({target})" if key else str(target or "a component")
    text = " ".join(str(cause).split()) or type(cause).__name__
    return MRLError(
        f"Could not build {where} from its settings: {type(cause).__name__}: {text}. Check the "
        f"{key + '.*' if key else 'related'} overrides; if they look right, rerun with HYDRA_FULL_ERROR=1 "
        "and report the traceback."
    )


def build_module(cfg: DictConfig, num_classes: int, in_chans: int, img_size: int) -> MatryoshkaModule:
    """Backbone, head and loss from config (also used by ``mrl-eval`` to rebuild a checkpoint's model)."""
    backbone = instantiate(cfg.backbone, in_chans=in_chans, img_size=img_size)
    head_cfg = OmegaConf.to_container(cfg.head, resolve=True)
    head = build_head(embed_dim=backbone.embed_dim, num_classes=num_classes, **head_cfg)
    weights = head_cfg.get("weights")
    check_loss_weights(weights, head.nesting)
    loss = MatryoshkaLoss(weights=weights, fused=head_cfg.get("fused", True), **cfg.get("loss", {}))
    optimizer = instantiate(cfg.optim) if cfg.get("optim") else None
    scheduler = instantiate(cfg.sched) if cfg.get("sched") and cfg.sched.get("_target_") else None
    return MatryoshkaModule(
        backbone,
        head,
        loss,
        optimizer,
        scheduler,
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def check_loss_weights(weights: list | None, nesting: list[int]) -> None:
    """``head.weights``: one finite, non-negative relative importance per size, not all zero (a loss
    weighted by zeros never moves, and the run would report an untrained model)."""
    if weights is None:
        return
    if len(weights) != len(nesting):
        raise MRLError(
            f"head.weights has {len(weights)} entries but the head trains {len(nesting)} sizes "
            f"{nesting}: give one relative importance weight per size, or head.weights=null."
        )
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        values = [float("nan")]
    if not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
        raise MRLError(
            f"head.weights={list(weights)} cannot train: each size's weight must be a finite number >= 0 "
            "and at least one must be positive (the loss is their weighted sum). Use e.g. "
            f"head.weights=[{','.join('1' for _ in nesting)}] or head.weights=null."
        )


def build_module_for_data(cfg: DictConfig, datamodule) -> MatryoshkaModule:
    """:func:`build_module` for ``datamodule``'s images, upsizing resizable small images (Fashion-MNIST's
    28 px) to the smallest power of two a backbone with many downsampling stages accepts."""
    resizable = datamodule.resizable and not getattr(datamodule, "img_size_fixed", True)
    module, size = build_with_upsizing(
        lambda px: build_module(cfg, datamodule.num_classes, datamodule.in_chans, px),
        datamodule.img_size,
        resizable,
    )
    if size != datamodule.img_size:
        log.warning(
            "Backbone %s needs images larger than %d px: resizing them to %d (set data.img_size to choose).",
            cfg.backbone.name,
            datamodule.img_size,
            size,
        )
        datamodule.resize(size)
    return module


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or not node.get("_target_"):
            continue
        if node._target_.endswith("WandbLogger") and not node.get("offline", False):
            node = _wandb_online_or_offline(node)
        # plain dicts and lists: wandb.init validates its `settings` and rejects an OmegaConf node
        logger = instantiate(node, _convert_="all")
        if isinstance(logger, WandbLogger):
            # Lightning always passes anonymous=None, which wandb warns about on every run (no effect)
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def _wandb_online_or_offline(node: DictConfig) -> DictConfig:
    """Online W&B without credentials (or without a reachable server) logs offline instead of failing
    the job: the run directory can be uploaded later with ``wandb sync``."""
    if os.environ.get("WANDB_MODE") == "":
        # An empty WANDB_MODE (e.g. `WANDB_MODE= mrl-train`) makes wandb reject its own settings; it
        # means "not set".
        del os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return node
    # Checked without wandb.login(): a failed login leaves wandb's global settings in a state where the
    # offline run afterwards still asks for a key.
    if not _wandb_credentials_available():
        reason = "no W&B credentials found (run `wandb login` or set WANDB_API_KEY)"
    else:
        reason = _wandb_server_unreachable()
        if reason is None:
            return node
    log.warning(
        "logger.wandb.offline=false but %s: logging offline instead; upload later with `wandb sync`.", reason
    )
    warnings.warn(f"W&B online requested but {reason}; logging offline.", stacklevel=2)
    node = node.copy()
    with open_dict(node):
        node.offline = True
    return node


def _wandb_credentials_available() -> bool:
    """An API key in WANDB_API_KEY or in the netrc entry of the W&B host (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_server_unreachable(timeout: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached (None when it can). A TCP connection is enough to tell: with
    credentials but no network, wandb.init would instead wait for its init timeout (90 s) and then fail
    the job."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"the W&B server {url.hostname}:{port} is not reachable ({err.strerror or err})"


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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the model ``cfg`` describes; return the final metrics written to results.json."""
    output_dir = Path(cfg.paths.output_dir)
    _check_output_dir(output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    datamodule = instantiate(cfg.data)
    module = build_module_for_data(cfg, datamodule)
    check_built(cfg, module.nesting, module.has_top5)  # metric and size names, now that sizes are known
    datamodule.configure_transforms(module.backbone.data_config())
    datamodule.prepare_data()
    previous_results = read_results(output_dir) if cfg.get("resume") else {}
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        # Read (safely) and checked here, before training starts, so a wrong file gets a clear message.
        check_compatible(load_checkpoint(ckpt_path), module, ckpt_path, module.config)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and c.get("_target_")]
    callbacks += [RestoreLoaderPosition(), *debug_hooks()]
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if cfg.trainer.get("enable_progress_bar", True) and not has_bar:
        callbacks.append(progress_bar(float(cfg.get("progress_bar_refresh_s", 1.0))))
    loggers = build_loggers(cfg)  # W&B starts lazily, at log_hyperparams below
    extra = {}
    if cfg.get("compile") and "inference_mode" not in cfg.trainer:
        # A compiled backbone is guarded on its input's dispatch keys: under inference_mode the sanity
        # check's batch and the later validation batches differ in them, so the evaluation graph was
        # compiled twice (three compiles in all; TORCH_LOGS=recompiles shows them, and the compile test
        # in tests/test_train_cli.py counts them). no_grad evaluation keeps one eval graph.
        extra["inference_mode"] = False
    if "plugins" not in cfg.trainer:
        extra["plugins"] = [AtomicCheckpointIO()]  # checkpoints appear only when complete
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)
    except (InstantiationException, MisconfigurationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, MisconfigurationException):
            raise
        raise MRLError(
            f"The trainer settings do not work on this machine: {' '.join(str(cause).split())} Choose "
            "another trainer (trainer=cpu, trainer=ddp_cpu) or fix the trainer.* overrides."
        ) from None
    for logger in loggers:
        logger.log_hyperparams(module.config)

    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except FloatingPointError as err:
            raise MRLError(f"{err} (checkpoints: {output_dir / 'checkpoints'})") from None
        if trainer.global_step == 0:
            raise MRLError(
                "The run ended without a single optimizer step, so there is no trained model to test or "
                "report; nothing was written to results.json. Give it at least one epoch with at least one "
                f"training batch (trainer.max_epochs={cfg.trainer.get('max_epochs')}; check also "
                "trainer.max_steps, trainer.limit_train_batches, and that the training split holds at "
                f"least one full batch of data.batch_size={cfg.data.get('batch_size')}: the last "
                "incomplete batch is dropped)."
            )
        # A resumed run adds to its results, never drops them: a run resumed after it had finished
        # trains no more and logs only the test metrics again.
        results = {**previous_results, **metrics_to_floats(trainer.callback_metrics)}
        if cfg.get("test", True):
            trainer.test(
                module,
                datamodule=datamodule,
                ckpt_path=_best_checkpoint(trainer, output_dir),
                verbose=False,
                weights_only=True,
            )
            results.update(metrics_to_floats(trainer.callback_metrics))
        if trainer.is_global_zero:
            _report(results, module.nesting, output_dir, loggers)
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                import wandb

                # Each job of a multirun gets its own W&B run.
                if wandb.run is not None:
                    wandb.finish()
    if cfg.get("evaluate") is not None and trainer.is_global_zero:
        _evaluate_checkpoint(cfg, trainer, output_dir)
    return results


def _evaluate_checkpoint(cfg: DictConfig, trainer: L.Trainer, output_dir: Path) -> None:
    """``evaluate=...``: mrl-eval on the checkpoint the test used (the best, else the last one)."""
    from mrl.checkpoints import CHECKPOINT_DIR, LAST
    from mrl.eval.after_training import evaluate_after_training

    best = _best_checkpoint(trainer, output_dir)
    ckpt = Path(best) if best else output_dir / CHECKPOINT_DIR / LAST
    if not ckpt.is_file():
        raise MRLError(
            f"evaluate=... needs a checkpoint of this run to evaluate, but none was written ({ckpt}). Keep "
            "the default checkpoint callbacks (callbacks=default) or drop the evaluate setting."
        )
    evaluate_after_training(cfg.evaluate, ckpt, output_dir, cfg)


def _best_checkpoint(trainer: L.Trainer, output_dir: Path) -> str | None:
    """The best checkpoint of this run (None without one): the test and ``evaluate=`` use it.

    A run resumed after its directory was moved or copied restores the old absolute path from the
    checkpoint's callback state; the file with that name in this run's checkpoint dir is the one meant.
    """
    from mrl.checkpoints import CHECKPOINT_DIR

    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not best:
        return None
    path = Path(best)
    if not path.is_relative_to(output_dir):
        path = output_dir / CHECKPOINT_DIR / path.name
    return str(path) if path.is_file() else None


def _report(results: dict[str, float], sizes: list[int], output_dir: Path, loggers: list[Logger]) -> None:
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

            logger.experiment.summary.update(results)
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
