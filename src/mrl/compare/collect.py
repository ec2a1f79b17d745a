"""Find the jobs of a sweep and read what each one measured into flat records.

A job is a directory holding the ``resolved_config.yaml`` that ``mrl-train`` writes when it starts. Its
``results.json`` (written when training ends) gives the trained heads' per-size top-1; the evaluations
of its checkpoints (:func:`mrl.eval.locations.find_evaluations`: ``evaluate=`` runs inside the job,
``mrl-eval`` runs linked from it, or an earlier version's ``eval/report.json``) add 1-NN, mAP@10 and,
for a standard model, the post-hoc SVD and truncation baselines.

Only comparable evaluations are compared: those of the same splits and data (report.json's
``evaluated`` and ``checkpoint.evaluated``; a report of an earlier version, which records neither,
counts as the defaults, the train split searched by the test split). The sweep's evaluation setting is
the one most jobs have (ties: the defaults first, then the name), and every record says the split it
was measured on (:attr:`Record.split`), which the tables show. A job may have been evaluated more than
once (several checkpoints, a checkpoint rewritten by a resumed run, other settings); its numbers come
from its newest evaluation with the sweep's setting (sizes it lacks from older evaluations of the same
checkpoint with that setting, e.g. after a ``sizes=`` rerun), and :class:`JobInfo` says which one that
was, how many there were and how many had other settings.

Rows are methods, not override strings: overrides make a separate row (a variant) only when they can
change what the job trained and measured, see :func:`changes_the_model`. A head trained on a frozen
model's features (``mrl-train source=<model>``) is its own method, named by its source
(``csr [source=standard]``), never averaged with end-to-end training, see :func:`variant_labels`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
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
# What the trained heads' top-1 of results.json was measured on (Record.split)
TOP1_SPLITS = {"test": "test split", "val": "validation split"}
# What an evaluation measured on: (database split, query split, data settings as JSON); comparable when equal
Setting = tuple[str, str, str]
# The setting of an evaluation that recorded none (earlier versions): mrl-eval's defaults
DEFAULT_SETTING: Setting = ("train", "test", "{}")
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
    split: str = ""  # what it was measured on: "test split", "test queries, train database", ...


@dataclass(frozen=True)
class Evaluation:
    """One evaluation report of a job and what it evaluated."""

    path: Path
    report: dict[str, Any]
    setting: tuple[
        str, str, str
    ]  # (database split, query split, data settings as JSON): comparable when equal
    checkpoint: str | None  # the checkpoint's content id (None: not recorded)

    @classmethod
    def read(cls, path: Path) -> Evaluation:
        report = read_json(path)
        evaluated = report.get("evaluated") or {}
        recorded = report.get("checkpoint") or {}
        settings = recorded.get("evaluated") or {}
        database = evaluated.get("database_split") or settings.get("database_split")
        query = evaluated.get("query_split") or settings.get("query_split")
        setting = evaluation_setting(database, query, settings.get("data"))
        return cls(path, report, setting, recorded.get("id"))

    @property
    def label(self) -> str:
        return setting_label(self.setting)


def setting_label(setting: Setting) -> str:
    """``test queries, train database`` (and the data settings, when any): what an evaluation's numbers
    were measured on; the same split for both: each query left out of its own neighbours."""
    database, query, data = setting
    text = f"{query} queries, {database} database"
    if database == query:
        text += " (each query left out of its own neighbours)"
    return text + (f", data {data}" if data != "{}" else "")


def comparable_setting(settings: Iterable[Iterable[Setting]]) -> Setting | None:
    """The evaluation setting the sweep compares (``settings``: those each job was evaluated with): the
    one most jobs have; ties: the defaults (train searched by test), then by name. None when no job was
    evaluated."""
    counts: dict[Setting, int] = {}
    for per_job in settings:
        for setting in set(per_job):
            counts[setting] = counts.get(setting, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda s: (-counts[s], s != DEFAULT_SETTING, s))


def evaluation_setting(database: Any, query: Any, data: Any) -> Setting:
    """The setting of an evaluation's splits and data settings (the defaults where it recorded none)."""
    if not (database and query):  # an earlier version's report: mrl-eval's defaults
        return DEFAULT_SETTING
    return (str(database), str(query), json.dumps(data or {}, sort_keys=True))


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
    evaluated: str | None = None  # what that evaluation measured on (setting_label)
    other_settings: int = 0  # evaluations left out: other splits or data than the sweep's setting


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


def read_overrides(job: Path) -> list[str]:
    """The command-line overrides Hydra recorded for ``job`` (none without a record); a record that cannot
    be read is an :class:`MRLError` naming it."""
    path = job / OVERRIDES
    if not path.is_file():
        return []
    try:
        overrides = yaml.safe_load(path.read_text()) or []
        problem = None if isinstance(overrides, list) else "not a list"
    except OSError as err:
        problem = err.strerror
    except yaml.YAMLError as err:
        problem = "not YAML: " + " ".join(str(err).split())
    if problem:
        raise MRLError(
            f"Cannot read {path} ({problem}): it is Hydra's record of the job's command-line overrides, "
            "which mrl-report names the job's row by. Restore the file (a list such as ['head=mrl_e', "
            "'seed=1']), or remove that job's directory from the sweep."
        )
    return [str(o) for o in overrides]


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
    overridden = {
        job: {override_key(o): o.partition("=")[2] or "~" for o in read_overrides(job)} for job in jobs
    }
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
    # a setting a job's config lacks and its command line did not set (head.dim of an MRL job beside FF
    # jobs of several head.dim) says nothing of that job: no "head.dim=default" in its row's name
    shown = {job: [k for k in varying if k in overridden[job] or _applies(configs[job], k)] for job in jobs}
    return {job: ",".join(f"{k}={settings[job][k][1]}" for k in shown[job]) for job in jobs}


def _applies(config: dict[str, Any], key: str) -> bool:
    """Whether the config has ``key`` (a config group, ``backbone=``, always applies)."""
    parent, _, leaf = key.replace("/", ".").rpartition(".")
    node = _select(config, parent) if parent else None
    return not parent or (isinstance(node, dict) and leaf in node)


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
    report: dict[str, Any], method: str, kind: str, suffix: str, add: Callable[..., None]
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


def job_evaluations(job: Path) -> list[Evaluation]:
    """Every evaluation of ``job``'s checkpoints, newest first."""
    return [Evaluation.read(path) for path in find_evaluations(job)]


def comparable_reports(evaluations: list[Evaluation], setting: Setting | None) -> list[Evaluation]:
    """The evaluations a job's numbers come from: its newest with the sweep's ``setting`` first, then
    the older ones of the same checkpoint with that setting (for the sizes the newest lacks)."""
    matching = [e for e in evaluations if e.setting == setting]
    if not matching:
        return []
    newest = matching[0]
    return [newest, *(e for e in matching[1:] if newest.checkpoint and e.checkpoint == newest.checkpoint)]


def read_job(
    job: Path,
    variant: str = "",
    root: Path | None = None,
    setting: Setting | None = DEFAULT_SETTING,
    evaluations: list[Evaluation] | None = None,
) -> tuple[list[Record], JobInfo]:
    """The job's per-size numbers (trained heads' top-1; 1-NN, mAP@10 and baselines of its evaluations
    with the sweep's ``setting``, :func:`comparable_reports`) and a summary of where they came from;
    paths relative to ``root``."""
    root = Path(root) if root is not None else job.parent
    config = read_config(job)
    head = config.get("head") or {}
    kind = str(head.get("kind", "mrl"))
    seed = int(config.get("seed", 0))
    method = method_label(head, config.get("objective")) + (f" [{variant}]" if variant else "")
    records: list[Record] = []
    seen: set[tuple[str, int, str]] = set()
    label = ""

    def add(m: str, size: Any, metric: str, value: Any) -> None:
        v = as_number(value)
        if v is not None and str(size).isdigit() and (m, int(size), metric) not in seen:
            seen.add((m, int(size), metric))  # a size of an older evaluation only where the newer lacks it
            records.append(Record(m, int(size), metric, v, seed, str(job), label))

    split = "none"
    if (job / RESULTS).is_file():
        split, per_size = trained_top1(read_json(job / RESULTS))
        label = TOP1_SPLITS.get(split, split)
        for size, value in per_size.items():
            add(method, size, "top1" if split == "test" else "val_top1", value)
    evaluations = job_evaluations(job) if evaluations is None else evaluations
    used = comparable_reports(evaluations, setting)
    for evaluation in used:
        label = evaluation.label
        eval_records(evaluation.report, method, kind, f" [{variant}]" if variant else "", add)
    recorded = (used[0].report.get("checkpoint") or {}).get("path") if used else None
    info = JobInfo(
        job=_relative(job, root),
        method=method,
        seed=seed,
        results=(job / RESULTS).is_file(),
        top1=split,
        evaluations=len(evaluations),
        eval_report=_relative(used[0].path, root) if used else None,
        checkpoint=_relative(Path(recorded), root) if recorded else None,
        evaluated=used[0].label if used else None,
        other_settings=sum(e.setting != setting for e in evaluations),
    )
    return records, info


def collect_jobs(root: Path) -> tuple[list[Record], list[JobInfo]]:
    """All records of the sweep under ``root`` and one :class:`JobInfo` per job (every job found), the
    evaluations' numbers from those with the sweep's setting (:func:`comparable_setting`)."""
    root = Path(root)
    jobs = find_jobs(root)
    labels = variant_labels(jobs)
    evaluations = {job: job_evaluations(job) for job in jobs}
    setting = comparable_setting([e.setting for e in per_job] for per_job in evaluations.values())
    records: list[Record] = []
    infos: list[JobInfo] = []
    for job in jobs:
        job_records, info = read_job(job, labels[job], root, setting, evaluations[job])
        records += job_records
        infos.append(info)
    return records, infos


def collect(root: Path) -> list[Record]:
    """All records of the sweep under ``root``."""
    return collect_jobs(root)[0]
