"""Records of a sweep read back from W&B (``mrl-report --wandb-group``), for sweeps whose directories
are not on this machine: training runs give per-size top-1 from their summary, evaluation runs (job
type ``eval``) 1-NN, mAP@10 and the post-hoc baselines. Needs network access and W&B credentials."""

from __future__ import annotations

from typing import Any

from mrl.compare.collect import Record, method_label
from mrl.errors import MRLError


def _per_size(summary: dict[str, Any], prefix: str) -> dict[int, float]:
    out = {}
    for key, value in summary.items():
        if key.startswith(prefix) and key[len(prefix) :].isdigit() and isinstance(value, (int, float)):
            out[int(key[len(prefix) :])] = float(value)
    return out


def run_records(config: dict[str, Any], summary: dict[str, Any], job_type: str, name: str) -> list[Record]:
    """Records of one W&B run (its config and summary as plain dicts)."""
    train_cfg = config.get("train", config) if job_type == "eval" else config
    head = train_cfg.get("head") or {}
    kind = str(head.get("kind", "mrl"))
    method = method_label(head)
    seed = int(train_cfg.get("seed", 0))
    records = []

    def add(method: str, metric: str, per_size: dict[int, float]) -> None:
        records.extend(Record(method, d, metric, v, seed, name) for d, v in per_size.items())

    if job_type == "eval":
        add(method, "1nn", _per_size(summary, "eval/knn/1nn@"))
        add(method, "map@10", _per_size(summary, "eval/retrieval/map@10@"))
        if kind == "standard":
            for base in ("svd", "slice"):
                add(base, "top1", _per_size(summary, f"eval/baselines/{base}@"))
                add(base, "1nn", _per_size(summary, f"eval/baselines/{base}_1nn@"))
    else:
        test = _per_size(summary, "test/acc@")
        add(method, "top1", test or _per_size(summary, "val/acc@"))
    return records


def wandb_records(group: str, project: str = "mrl", entity: str | None = None) -> list[Record]:
    """Every record of the runs in W&B group ``group``."""
    import wandb

    try:
        api = wandb.Api(timeout=30)
        path = f"{entity}/{project}" if entity else project
        runs = list(api.runs(path, filters={"group": group}))
    except Exception as err:  # wandb raises its own and requests' errors for network and auth failures
        raise MRLError(
            f"Cannot read the W&B group {group!r} of project {project!r} "
            f"({' '.join(str(err).split())[:200]}). "
            "mrl-report needs network access and `wandb login` for that; offline, give it the sweep "
            "directory instead (logs/train/multiruns/<...>)."
        ) from None
    if not runs:
        raise MRLError(f"The W&B project {project!r} has no runs in group {group!r}; check the group name.")
    records = []
    for run in runs:
        records += run_records(dict(run.config), dict(run.summary), run.job_type or "train", run.name)
    return records
