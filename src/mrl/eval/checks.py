"""Pre-flight checks of an ``mrl-eval`` config: the job's own settings (device, splits, sizes, chunks,
...) and every evaluator's sections, by the checks each evaluator names (``Evaluator.checks``, beside
it). :mod:`mrl.preflight` runs them before the checkpoint is read, and :func:`mrl.eval.run.evaluate`
again for callers that skip the commands."""

from __future__ import annotations

import re

from mrl.config_checks import Node, boolean, int_list, mapping, one_of, positive_int, require
from mrl.eval.context import SEARCHES
from mrl.eval.evaluators import EVALUATORS


def check_eval_config(cfg: Node, prefix: str = "") -> None:
    """Every ``mrl-eval`` setting that can be judged before the checkpoint is read (``prefix``:
    ``evaluate.`` when the settings come from mrl-train's ``evaluate=``)."""
    p = prefix
    positive_int(cfg, "threads", p, f"{p}threads=4", optional=True)
    device = cfg.get("device", "auto")
    require(
        isinstance(device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
        f"{p}device",
        device,
        "auto, cpu, cuda or cuda:<index>",
        f"{p}device=cpu",
    )
    one_of(cfg, "embedding_dtype", p, ("float32", "float16"))
    one_of(cfg, "search", p, SEARCHES)
    boolean(cfg, "export_model", p)
    for key in ("database_split", "query_split"):
        if key in cfg:
            require(isinstance(cfg[key], str), f"{p}{key}", cfg[key], "a split name", f"{p}{key}=test")
    int_list(cfg, "sizes", p, f"{p}sizes=[8,16,32] (or null: every trained size)")
    mapping(cfg.get("data"), f"{p}data", f"+{p}data.data_dir=/data/fmnist")
    methods = mapping(cfg.get("methods"), f"{p}methods", f"{p}methods.knn=false")
    for key in methods:
        boolean(methods, key, f"{p}methods.")
    chunks = mapping(cfg.get("chunks"), f"{p}chunks", f"{p}chunks.query=4096")
    for key in chunks:
        positive_int(chunks, key, f"{p}chunks.", f"{p}chunks.{key}=4096")
    for evaluator in EVALUATORS:
        for check in evaluator.checks:
            check(cfg, p)
