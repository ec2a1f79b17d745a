"""What the runs really logged: history, summary and system-metric keys and the config of W&B runs.

A dashboard's panels may only name keys that exist, so the keys come from the runs themselves: an
offline (or online) run directory is read with W&B's own reader, ``wandb leet inspect --json`` (the
run's transaction log, record by record); runs that live only on the W&B server are read through the
public API (``historyKeys``, summary, config). Nothing here guesses a key from the code that logs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.errors import MRLError

# keys W&B adds to every history row; never worth a panel of their own
INTERNAL = ("_step", "_runtime", "_timestamp")


@dataclass
class LoggedRun:
    """One W&B run as its records show it."""

    name: str = ""
    run_id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    path: str = ""  # the run directory (local runs) or entity/project/id (runs read from the server)
    history: set[str] = field(default_factory=set)  # scalar history keys (``val/acc@4``, ``epoch``)
    media: set[str] = field(default_factory=set)  # tables and images (``val/acc_vs_size``)
    summary: set[str] = field(default_factory=set)  # flattened: ``val/acc@4.max``, ``test/acc@4``
    system: set[str] = field(default_factory=set)  # as panels name them: ``system/proc.memory.rssMB``
    config: dict[str, Any] = field(default_factory=dict)


def wandb_executable() -> str:
    """The ``wandb`` command of this environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "wandb"
    if beside.exists():
        return str(beside)
    found = shutil.which("wandb")
    if not found:
        raise MRLError("The `wandb` command is not installed in this environment; `pip install wandb`.")
    return found


def _flatten(value: Any, prefix: str) -> Iterable[str]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}.{key}")
    else:
        yield prefix


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if key.startswith("_wandb"):
            continue  # W&B's own bookkeeping (its chart definitions), not the run's settings
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def parse_records(lines: Iterable[str], path: str = "") -> LoggedRun:
    """A :class:`LoggedRun` from the JSON records ``wandb leet inspect --json`` prints (one a line)."""
    run = LoggedRun(path=path)
    raw_history: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.get("type")
        body = record.get(kind) or {}
        if kind == "run":
            run.name = body.get("display_name", "")
            run.run_id = body.get("run_id", "")
            run.project = body.get("project", "")
            run.group = body.get("run_group", "")
            run.job_type = body.get("job_type", "")
            _merge(run.config, (body.get("config") or {}).get("update") or {})
        elif kind == "config":
            _merge(run.config, body.get("update") or {})
        elif kind == "history":
            raw_history |= set((body.get("item") or {}).keys())
        elif kind == "summary":
            for key, value in (body.get("update") or {}).items():
                run.summary.update(_flatten(value, key))
        elif kind == "stats":
            run.system |= {f"system/{k}" for k in (body.get("item") or {})}
    run.media = {k.removesuffix("._type") for k in raw_history if k.endswith("._type")}
    run.history = {
        k for k in raw_history if not any(k.startswith(m + ".") for m in run.media) and k not in INTERNAL
    }
    return run


def leet_inspect(run_dir: str | Path, *flags: str) -> str:
    """What ``wandb leet inspect <flags> <run_dir>`` prints of a local run directory.

    Why not always the ``wandb`` console script: it only finds the run's ``.wandb`` log and runs W&B's
    own reader, the ``wandb-core leet inspect`` binary, on it, after a second of Python start-up; a
    sweep's dashboard reads every run. This runs that binary with the arguments the script gives it
    (the same output, checked by a test against the script), and the script itself where this wandb
    has no such binary or the directory holds no single log.
    """
    logs = list(Path(run_dir).glob("*.wandb"))
    core = _wandb_core()
    if core and len(logs) == 1:
        log = logs[0].resolve()
        args = [core, "leet", "inspect", "--no-observability", *flags, "--run-file", str(log)]
        args.append(str(log.parent.parent))
    else:
        args = [wandb_executable(), "leet", "inspect", *flags, str(run_dir)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise MRLError(f"Cannot read the W&B run {run_dir} with `wandb leet inspect` ({reason}).")
    return proc.stdout


def _wandb_core() -> str | None:
    """W&B's ``wandb-core`` binary, or None where this wandb does not ship one."""
    try:
        from wandb.util import get_core_path

        return get_core_path()
    except Exception:  # an older or newer wandb without it: the console script does the same
        return None


def read_run(run_dir: str | Path) -> LoggedRun:
    """The keys and config of one local W&B run directory (``.../wandb/offline-run-*`` or ``run-*``)."""
    return parse_records(leet_inspect(run_dir, "--json").splitlines(), str(run_dir))


RUN_DIR = re.compile(r"^(offline-)?run-\d{8}_\d{6}-\w+$")


def find_run_dirs(root: str | Path, max_depth: int | None = None) -> list[Path]:
    """Every W&B run directory under ``root`` (one holding a ``run-*.wandb`` log), sorted by path."""
    root = Path(root)
    found = []
    for log in root.rglob("run-*.wandb"):
        run_dir = log.parent
        depth = len(run_dir.relative_to(root).parts)
        if RUN_DIR.match(run_dir.name) and (max_depth is None or depth <= max_depth):
            found.append(run_dir)
    return sorted(set(found))


def local_runs(root: str | Path, project: str | None = None, max_depth: int | None = None) -> list[LoggedRun]:
    """The runs under ``root`` (of W&B project ``project`` when given)."""
    runs = read_runs(find_run_dirs(root, max_depth))
    return [r for r in runs if project is None or r.project == project]


def read_runs(run_dirs: Iterable[Path]) -> list[LoggedRun]:
    """:func:`read_run` of each directory, a few at a time (each is a ``wandb`` process of about 1 s)."""
    from concurrent.futures import ThreadPoolExecutor

    run_dirs = list(run_dirs)
    if not run_dirs:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(run_dirs))) as pool:
        return list(pool.map(read_run, run_dirs))


def server_runs(project: str, entity: str | None = None, filters: dict | None = None) -> list[LoggedRun]:
    """The runs of ``entity/project`` on the W&B server (needs network and credentials)."""
    import wandb

    api = wandb.Api(timeout=30)
    path = f"{entity}/{project}" if entity else project
    found = []
    for run in api.runs(path, filters=filters or {}, lazy=False):
        history_keys = (run.history_keys or {}).get("keys") or {}
        summary = dict(run.summary_metrics or {})
        found.append(
            LoggedRun(
                name=run.name,
                run_id=run.id,
                project=project,
                group=run.group or "",
                job_type=run.job_type or "",
                path="/".join(run.path),
                history={k for k in history_keys if k not in INTERNAL},
                summary={k for key, v in summary.items() for k in _flatten(v, key)},
                system={f"system/{k.removeprefix('system.')}" for k in (run.system_metrics or {})},
                config={k: v for k, v in dict(run.config).items() if not k.startswith("_wandb")},
            )
        )
    return found


def sizes(keys: Iterable[str], prefix: str) -> list[int]:
    """The sizes ``d`` of the keys ``<prefix>@<d>`` among ``keys``, in numeric order (1, 2, 4, ..., 64,
    not the text order 1, 16, 2, ... that W&B's default panels follow)."""
    found = set()
    for key in keys:
        if key.startswith(prefix + "@") and key[len(prefix) + 1 :].isdigit():
            found.add(int(key[len(prefix) + 1 :]))
    return sorted(found)


def union(runs: Iterable[LoggedRun], attr: str) -> set[str]:
    out: set[str] = set()
    for run in runs:
        out |= getattr(run, attr)
    return out


_ABSENT = object()


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """The value at ``head.kind`` of a nested config (None when absent)."""
    value = _lookup(config, dotted)
    return None if value is _ABSENT else value


def has_config(config: dict[str, Any], dotted: str) -> bool:
    """Whether the nested config holds ``dotted`` (also when its value is None)."""
    return _lookup(config, dotted) is not _ABSENT
