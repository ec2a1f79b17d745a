"""Records of a sweep read back from W&B (``mrl-report --wandb-group``), for sweeps whose directories
are not on this machine: training runs give per-size top-1 from their summary, evaluation runs (job
type ``eval``) 1-NN, mAP@10 and the post-hoc baselines. As for a sweep directory, only evaluations on the
splits and data most training runs were evaluated on are compared (an evaluation run's config ``eval``
says which), each record says what it was measured on, and of several such evaluation runs of one
training run only the newest counts. Needs network access and W&B credentials."""

from __future__ import annotations

from typing import Any

from mrl.compare.collect import (
    TOP1_SPLITS,
    Record,
    Setting,
    comparable_setting,
    evaluation_setting,
    method_label,
    setting_label,
)
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
    method = method_label(head, train_cfg.get("objective"))
    seed = int(train_cfg.get("seed", 0))
    records = []
    split = setting_label(_setting(config)) if job_type == "eval" else ""

    def add(method: str, metric: str, per_size: dict[int, float]) -> None:
        records.extend(Record(method, d, metric, v, seed, name, split) for d, v in per_size.items())

    if job_type == "eval":
        add(method, "1nn", _per_size(summary, "eval/knn/1nn@"))
        add(method, "map@10", _per_size(summary, "eval/retrieval/map@10@"))
        if kind == "standard":
            for base in ("svd", "slice"):
                add(base, "top1", _per_size(summary, f"eval/baselines/{base}@"))
                add(base, "1nn", _per_size(summary, f"eval/baselines/{base}_1nn@"))
    else:
        test = _per_size(summary, "test/acc@")
        split = TOP1_SPLITS["test" if test else "val"]
        if test:
            add(method, "top1", test)
        else:  # kept apart from test numbers, as for a sweep directory
            add(method, "val_top1", _per_size(summary, "val/acc@"))
    return records


def _trained_run(config: dict[str, Any], name: str) -> str:
    """Which training run an evaluation run evaluated: its W&B id when recorded, else the run's name."""
    train_cfg = config.get("train") or {}
    wandb_cfg = (train_cfg.get("logger") or {}).get("wandb") or {}
    return str(wandb_cfg.get("id") or name)


def _setting(config: dict[str, Any]) -> Setting:
    """The splits and data an evaluation run measured on (its config's ``eval``: mrl-eval's settings)."""
    settings = config.get("eval") or {}
    return evaluation_setting(
        settings.get("database_split"), settings.get("query_split"), settings.get("data")
    )


def newest_evaluations(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` (dicts with config, summary, job_type, name, created_at) with only the newest evaluation
    run of each training run among those on the splits and data most training runs were evaluated on
    (:func:`mrl.compare.collect.comparable_setting`): an evaluation repeated on the same run must not
    count as another seed, nor one on another split be compared with the others."""
    evaluations = [run for run in runs if run["job_type"] == "eval"]
    by_trained: dict[str, set[Setting]] = {}
    for run in evaluations:
        by_trained.setdefault(_trained_run(run["config"], run["name"]), set()).add(_setting(run["config"]))
    setting = comparable_setting(by_trained.values())
    newest: dict[str, dict[str, Any]] = {}
    others = [run for run in runs if run["job_type"] != "eval"]
    for run in evaluations:
        if _setting(run["config"]) != setting:
            continue
        key = _trained_run(run["config"], run["name"])
        if key not in newest or str(run["created_at"]) > str(newest[key]["created_at"]):
            newest[key] = run
    return others + list(newest.values())


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
    found = [
        {
            "config": dict(run.config),
            "summary": dict(run.summary),
            "job_type": run.job_type or "train",
            "name": run.name,
            "created_at": run.created_at,
        }
        for run in runs
    ]
    records = []
    for run in newest_evaluations(found):
        records += run_records(run["config"], run["summary"], run["job_type"], run["name"])
    return records
