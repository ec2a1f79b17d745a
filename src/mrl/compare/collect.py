"""Find the jobs of a sweep and read what each one measured into flat records.

A job is a directory holding the ``resolved_config.yaml`` that ``mrl-train`` writes when it starts. Its
``results.json`` (written when training ends) gives the trained heads' per-size top-1; the evaluations
of its checkpoints (:func:`mrl.eval.locations.find_evaluations`: ``evaluate=`` runs inside the job,
``mrl-eval`` runs linked from it, or an earlier version's ``eval/report.json``) add 1-NN, mAP@10 and,
for a standard model, the post-hoc SVD and truncation baselines. A job may have been evaluated more
than once (several checkpoints, or a checkpoint rewritten by a resumed run); its numbers come from the
newest evaluation, and :class:`JobInfo` says which one that was and how many there were.

Rows are methods, not override strings: overrides make a separate row (a variant) only when they can
change what the job trained and measured, see :func:`changes_the_model`. A head trained on a frozen
model's features (``mrl-train source=<model>``) is its own method, named by its source
(``csr [source=standard]``), never averaged with end-to-end training, see :func:`variant_labels`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mrl.errors import MRLError
from mrl.eval.locations import find_evaluations

RESULTS = "results.json"
CONFIG = "resolved_config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
# Overrides that say which method or seed a job is (the row's name, head.weights included, and what is
# averaged over), not which variant of the experiment it belongs to.
# The objective's kind (objective=supcon) is part of the method's name too (method_label).
IDENTITY_KEYS = {
    "seed",
    "head",
    "head.kind",
    "head.dim",
    "head.weights",
    "objective",
    "objective.kind",
    "resume",
    # a frozen-source job is named by its source (variant_labels), not by the path as a variant
    "source",
}
# Overrides that cannot change what is trained (model, data, optimisation settings), only how the job
# runs, where it writes and what it records: they never split a row. Everything else may (an unknown
# key is assumed to matter: two rows that should be one are visible, one row mixing two models is not).
# - evaluate*: the evaluation after training (which methods, which k), not the model;
# - logger*, tags, paths*, hydra*, progress_bar_refresh_s, the progress bar and model summary: output;
# - threads, compile, channels_last, data.num_workers, data.pin_memory, data.eval_batch_size: how the
#   same model is trained on the same data with the same settings: float rounding may differ, and so
#   may the random draws (image-folder crops come from each loader worker's stream, compiled dropout
#   from inductor's), which is what different seeds do and what the rows average over;
# - checkpoint_every_n_steps, trainer.log_every_n_steps: extra checkpoints and logged steps;
# - test, optimized_metric, hparams_search, task_name: whether the test split is measured (a job
#   without it is listed as such) and what a sweeper reads.
INCIDENTAL_KEYS = (
    "evaluate",
    "logger",
    "tags",
    "paths",
    "hydra",
    "progress_bar_refresh_s",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "threads",
    "compile",
    "channels_last",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "checkpoint_every_n_steps",
    "trainer.log_every_n_steps",
    "test",
    "optimized_metric",
    "hparams_search",
    "task_name",
    # where a frozen source's features are cached and which device computes them (float rounding)
    "features.cache_dir",
    "features.device",
)
METRICS = ("top1", "val_top1", "1nn", "map@10")
# Config groups that pick a whole recipe (experiment=<name>): jobs of different recipes are told apart
# by the resolved settings the recipes set differently (``backbone.embed_dim=null``), not by the recipe
# names, so two recipes that train the same model share a row and a row's name says what differs.
RECIPE_GROUPS = ("experiment",)


@dataclass(frozen=True)
class Record:
    """One number: ``metric`` of ``method`` at ``size`` from one job (seed); values are fractions."""

    method: str
    size: int
    metric: str
    value: float
    seed: int
    job: str


@dataclass(frozen=True)
class JobInfo:
    """What one job contributed and where its numbers came from (the report lists every job)."""

    job: str
    method: str
    seed: int
    results: bool  # results.json found (written when training ends)
    top1: str  # "test", "val" (no test metrics: its own table), or "none"
    evaluations: int  # evaluations of the job's checkpoints found
    eval_report: str | None  # the report.json its 1-NN / mAP@10 / baselines came from (the newest)
    checkpoint: str | None  # the checkpoint that evaluation recorded (None: not recorded, older versions)


def find_jobs(root: Path) -> list[Path]:
    """Every job directory under ``root`` (itself included), sorted by path: finished or not."""
    root = Path(root)
    if not root.is_dir():
        raise MRLError(
            f"{root} is not a directory. Give mrl-report the sweep directory of a multirun "
            "(logs/train/multiruns/<date>_<id>) or a folder of mrl-train run directories."
        )
    jobs = sorted(p.parent for p in root.rglob(CONFIG))
    if not jobs:
        raise MRLError(
            f"No mrl-train jobs under {root}: no directory there holds a {CONFIG} (mrl-train writes one "
            "into each job's directory when the job starts). Give the sweep directory of a multirun "
            "(logs/train/multiruns/<date>_<id>) or a folder of mrl-train run directories."
        )
    return jobs


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MRLError(f"Cannot read {path} ({err}); rerun that job or remove its directory.") from None


def read_config(job: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((job / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise MRLError(f"Cannot read {job / CONFIG} ({err}); remove that job's directory.") from None


def _overrides(job: Path) -> list[str]:
    path = job / OVERRIDES
    if not path.is_file():
        return []
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def override_key(override: str) -> str:
    """``trainer.max_epochs`` of ``+trainer.max_epochs=3``; ``hydra/launcher`` of ``hydra/launcher=x``."""
    return override.split("=", 1)[0].lstrip("+~")


def changes_the_model(key: str) -> bool:
    """Whether an override of ``key`` can make a job train or measure a different model than the same
    job without it (so it makes its own row); see ``INCIDENTAL_KEYS`` for the ones that cannot."""
    for prefix in INCIDENTAL_KEYS:
        if key == prefix or key.startswith((prefix + ".", prefix + "/")):
            return False
    return True


def _select(config: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a resolved config, or None when it has none."""
    node: Any = config
    for part in key.replace("/", ".").split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _setting(config: dict[str, Any], key: str, overridden: dict[str, str]) -> tuple[str, str]:
    """``(value to compare, value to show)`` of ``key`` in one job. A plain value is compared as the job
    resolved it (``max_epochs=4`` given or left at a default of 4 is the same setting); a config group
    (``backbone=resnet50``) by the option the job chose."""
    resolved = _select(config, key)
    shown = overridden.get(key)
    if resolved is not None and not isinstance(resolved, dict):
        value = json.dumps(resolved, sort_keys=True)
        return value, shown if shown is not None else value
    return (shown or "default"), (shown or "default")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a resolved config's leaves (a list is one value)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _inside(value: Any, output_dir: Any) -> bool:
    """Whether ``value`` is a path in the job's own output dir (differs between any two jobs)."""
    return isinstance(value, str) and isinstance(output_dir, str) and output_dir in value


def recipe_settings(configs: dict[Path, dict[str, Any]]) -> dict[Path, dict[str, tuple[str, str]]]:
    """Per job, the resolved settings in which the jobs differ and which can change the model: what
    different recipes set differently. Not the method or seed, incidental keys, a job's own paths
    (``trainer.default_root_dir``) or settings that follow the seed (``data.seed: ${seed}``)."""
    leaves = {job: _leaves(config) for job, config in configs.items()}
    out: dict[Path, dict[str, tuple[str, str]]] = {job: {} for job in configs}
    for key in sorted({k for per_job in leaves.values() for k in per_job}):
        if key in IDENTITY_KEYS or not changes_the_model(key):
            continue
        values = {job: per_job.get(key) for job, per_job in leaves.items()}
        shown = {job: json.dumps(v, sort_keys=True) for job, v in values.items()}
        own_path = any(_inside(v, _select(configs[job], "paths.output_dir")) for job, v in values.items())
        # compared as JSON: True == 1 and False == 0 would make a switch set per job look like the seed
        follows_seed = all(shown[job] == json.dumps(configs[job].get("seed")) for job in values)
        if len(set(shown.values())) > 1 and not own_path and not follows_seed:
            for job in configs:
                out[job][key] = (shown[job], shown[job].strip('"'))
    return out


def source_names(sources: set[str]) -> dict[str, str]:
    """A short name per frozen source path: its run's directory for an ``mrl-train`` checkpoint
    (``<run>/checkpoints/x.ckpt``), the folder of a ``model.safetensors`` export, else the file's name;
    the path itself where two sources would share a name (two rows must never become one)."""

    def short(source: str) -> str:
        path = Path(source)
        if path.parent.name == "checkpoints" and path.parent.parent.name:
            return path.parent.parent.name
        if path.name == "model.safetensors" and path.parent.name:
            return path.parent.name
        return path.name or source

    names = {source: short(source) for source in sources}
    taken = list(names.values())
    return {source: name if taken.count(name) == 1 else source for source, name in names.items()}


def variant_labels(jobs: list[Path]) -> dict[Path, str]:
    """Per job, the settings that tell the sweep's variants apart (:func:`setting_labels`), after
    ``source=<name>`` for a head trained on a frozen source (:func:`source_names`). Jobs of different
    sources (end-to-end training being one) are compared apart: a setting that differs only between
    them (the head jobs' shorter training) is part of what the source's name says, not a variant."""
    sources = {job: read_config(job).get("source") for job in jobs}
    names = source_names({str(s) for s in sources.values() if s})
    labels: dict[Path, str] = {}
    for source in dict.fromkeys(sources.values()):
        members = [job for job in jobs if sources[job] == source]
        for job, label in setting_labels(members).items():
            parts = ([f"source={names[str(source)]}"] if source else []) + ([label] if label else [])
            labels[job] = ",".join(parts)
    return labels


def setting_labels(jobs: list[Path]) -> dict[Path, str]:
    """Per job, the settings that tell the jobs' variants apart: overrides of keys that can change the
    model (not method, seed or incidental keys) whose values differ between the jobs; where the jobs come
    from different recipes (``RECIPE_GROUPS``), the resolved settings the recipes set differently."""
    overridden = {job: {override_key(o): o.partition("=")[2] or "~" for o in _overrides(job)} for job in jobs}
    keys = sorted(
        {
            k
            for per_job in overridden.values()
            for k in per_job
            if k not in IDENTITY_KEYS and changes_the_model(k)
        }
    )
    configs = {job: read_config(job) for job in jobs}
    settings = {job: {k: _setting(configs[job], k, overridden[job]) for k in keys} for job in jobs}
    varying = [k for k in keys if len({settings[job][k][0] for job in jobs}) > 1]
    if any(k in RECIPE_GROUPS for k in varying):
        resolved = recipe_settings(configs)
        varying = [k for k in varying if k not in RECIPE_GROUPS]
        for job in jobs:  # a key both overridden and set by a recipe: the resolved value says it all
            settings[job] = {**{k: settings[job][k] for k in varying}, **resolved[job]}
        varying = sorted({*varying, *(k for per_job in resolved.values() for k in per_job)})
    return {job: ",".join(f"{k}={settings[job][k][1]}" for k in varying) for job in jobs}


def method_label(head: dict[str, Any], objective: dict[str, Any] | None = None) -> str:
    """The method a job trained, from its head and objective configs: the head's kind, ``+<objective>``
    when a contrastive loss trained the backbone (``mrl+supcon``: its own row, never averaged with the
    cross-entropy runs; plain ``mrl`` for cross-entropy, the default), plus ``[w=...]`` when it weighted
    the sizes' losses unevenly (the paper's relative importance c_m), so such a run is its own row, not
    averaged with the plain MRL seeds."""
    kind = str(head.get("kind", "mrl"))
    objective_kind = str((objective or {}).get("kind", "ce"))
    if objective_kind != "ce":
        kind = f"{kind}+{objective_kind}"
    weights = head.get("weights")
    if weights and len({float(w) for w in weights}) > 1:
        return f"{kind} [w={','.join(f'{float(w):g}' for w in weights)}]"
    return kind


def as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _per_size(results: dict[str, Any], prefix: str) -> dict[int, float]:
    out = {}
    for key, value in results.items():
        size = key[len(prefix) :]
        if key.startswith(prefix) and size.isdigit() and as_number(value) is not None:
            out[int(size)] = float(value)
    return out


def trained_top1(results: dict[str, Any]) -> tuple[str, dict[int, float]]:
    """``("test", per size)`` from a job's results; ``("val", ...)`` when it has no test metrics (kept
    apart: a validation number averaged with test numbers would be neither); ``("none", {})``."""
    for split in ("test", "val"):
        per_size = _per_size(results, f"{split}/acc@")
        if per_size:
            return split, per_size
    return "none", {}


def eval_records(
    report: dict[str, Any], method: str, kind: str, suffix: str, add: Callable[[str, Any, str, Any], None]
) -> None:
    """1-NN and mAP@10 per size of one evaluation report; for a standard model also its SVD and
    truncation baselines (rows ``svd``/``slice`` with the job's variant ``suffix``)."""
    for size, row in (report.get("knn") or {}).items():
        add(method, size, "1nn", (row or {}).get("1nn"))
    for size, row in (report.get("retrieval") or {}).items():
        add(method, size, "map@10", (row or {}).get("map@10"))
    if kind == "standard":
        baselines = report.get("baselines") or {}
        for name in ("svd", "slice"):
            for size, value in (baselines.get(name) or {}).items():
                add(name + suffix, size, "top1", value)
            for size, value in (baselines.get(f"{name}_1nn") or {}).items():
                add(name + suffix, size, "1nn", value)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside (both resolved, as find_evaluations' paths are)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def read_job(job: Path, variant: str = "", root: Path | None = None) -> tuple[list[Record], JobInfo]:
    """The job's per-size numbers (trained heads' top-1; 1-NN, mAP@10 and baselines of its newest
    evaluation) and a summary of where they came from; paths relative to ``root``."""
    root = Path(root) if root is not None else job.parent
    config = read_config(job)
    head = config.get("head") or {}
    kind = str(head.get("kind", "mrl"))
    seed = int(config.get("seed", 0))
    method = method_label(head, config.get("objective")) + (f" [{variant}]" if variant else "")
    records: list[Record] = []

    def add(m: str, size: Any, metric: str, value: Any) -> None:
        v = as_number(value)
        if v is not None and str(size).isdigit():
            records.append(Record(m, int(size), metric, v, seed, str(job)))

    split = "none"
    if (job / RESULTS).is_file():
        split, per_size = trained_top1(read_json(job / RESULTS))
        for size, value in per_size.items():
            add(method, size, "top1" if split == "test" else "val_top1", value)
    reports = find_evaluations(job)
    checkpoint = None
    if reports:
        report = read_json(reports[0])
        eval_records(report, method, kind, f" [{variant}]" if variant else "", add)
        recorded = (report.get("checkpoint") or {}).get("path")
        checkpoint = _relative(Path(recorded), root) if recorded else None
    info = JobInfo(
        job=_relative(job, root),
        method=method,
        seed=seed,
        results=(job / RESULTS).is_file(),
        top1=split,
        evaluations=len(reports),
        eval_report=_relative(reports[0], root) if reports else None,
        checkpoint=checkpoint,
    )
    return records, info


def collect_jobs(root: Path) -> tuple[list[Record], list[JobInfo]]:
    """All records of the sweep under ``root`` and one :class:`JobInfo` per job (every job found)."""
    root = Path(root)
    jobs = find_jobs(root)
    labels = variant_labels(jobs)
    records: list[Record] = []
    infos: list[JobInfo] = []
    for job in jobs:
        job_records, info = read_job(job, labels[job], root)
        records += job_records
        infos.append(info)
    return records, infos


def collect(root: Path) -> list[Record]:
    """All records of the sweep under ``root``."""
    return collect_jobs(root)[0]
