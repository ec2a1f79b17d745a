"""Save a workspace or report to W&B, or, offline, write the exact spec it would save.

The W&B API needs the network and an account. Whether both are there is decided before any call to it
(:func:`offline_reason`, the same checks ``mrl-train`` makes before logging online); without them the
command says so in one line and writes a spec file instead: the library's own serialisation of the
object (``Workspace._to_model()`` / ``Report._to_model()``, dumped as W&B stores it) with the project,
the entity and the keys its panels name. ``mrl-dashboard --from-spec <file>`` reads it back with the
library's ``_from_model`` and saves it, once the runs are uploaded (``wandb sync``) and the machine is
online. The one thing a spec file leaves out is what only the server knows: the entity when none was
given (the account's default) and the internal id of the report's runset project, looked up at save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mrl.errors import MRLError
from mrl.files import atomic_write_text

FORMAT = (
    "mrl dashboard spec 1: `spec` is wandb-workspaces' own serialisation of the {kind} "
    "({cls}._to_model(), dumped by alias); create it with `mrl-dashboard --from-spec <this file>`"
)


def offline_reason() -> str | None:
    """Why the W&B API cannot be used now (None when it can): W&B set offline, no credentials, or the
    server unreachable. Decided without calling the API."""
    from mrl.tracking.wandb_setup import wandb_credentials_available, wandb_server_unreachable

    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}"
    if not wandb_credentials_available():
        return "no W&B credentials (run `wandb login` or set WANDB_API_KEY)"
    return wandb_server_unreachable()


def _kind(obj: Any) -> str:
    import wandb_workspaces.workspaces as ws

    return "workspace" if isinstance(obj, ws.Workspace) else "report"


def dump(obj: Any) -> dict[str, Any]:
    """The library's serialisation of a workspace or report (makes no API call for the objects built
    here: their runsets name no project)."""
    return obj._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def _add(out: list[str], key: str | None) -> None:
    if key and key not in out:
        out.append(key)


def _accessor(keys: dict[str, list[str]], accessor: str) -> None:
    section, _, name = accessor.partition(":")
    if section == "summary":
        _add(keys["summary"], name)
    elif section == "config":
        _add(keys["config"], ".".join(p for p in name.split(".") if p != "value"))


def _walk(node: Any, keys: dict[str, list[str]]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, keys)
        return
    if not isinstance(node, dict):
        return
    config = node.get("config") if "viewType" in node else None
    if isinstance(config, dict):
        for metric in config.get("metrics") or []:
            _add(keys["history"], metric)
        _add(keys["history"], config.get("xAxis"))
        for column in config.get("columns") or []:
            _accessor(keys, f"{column.get('accessor')}")
        if config.get("groupBy"):
            _add(keys["config"], ".".join(p for p in config["groupBy"].split(".") if p != "value"))
    for value in node.values():
        _walk(value, keys)


def panel_keys(spec: dict[str, Any]) -> dict[str, list[str]]:
    """The run keys a dumped spec's panels name, by where W&B reads them: ``history`` (line and bar
    charts, their x axes), ``summary`` and ``config`` (parallel coordinates, grouping)."""
    keys: dict[str, list[str]] = {"history": [], "summary": [], "config": []}
    _walk(spec, keys)
    return keys


def document(obj: Any, created_by: str, **extra: Any) -> dict[str, Any]:
    """The spec file's content: what it is, where it goes, the keys it names, and the spec itself."""
    import wandb_workspaces

    kind = _kind(obj)
    spec = dump(obj)
    return {
        "kind": kind,
        "format": FORMAT.format(kind=kind, cls="Workspace" if kind == "workspace" else "Report"),
        "wandb_workspaces": getattr(wandb_workspaces, "__version__", None) or _version(),
        "created_by": created_by,
        "entity": obj.entity or None,
        "project": obj.project,
        **extra,
        "keys": panel_keys(spec),
        "spec": spec,
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wandb-workspaces")
    except PackageNotFoundError:
        return None


def write_document(doc: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_document(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MRLError(f"Cannot read the dashboard spec {path} ({err}).") from None
    if not isinstance(doc, dict) or doc.get("kind") not in ("workspace", "report") or "spec" not in doc:
        raise MRLError(
            f"{path} is not a dashboard spec written by mrl-dashboard or mrl-report --wandb-report "
            "(it needs `kind` workspace or report, and `spec`)."
        )
    return doc


def from_document(doc: dict[str, Any]) -> Any:
    """The workspace or report a spec file holds, rebuilt by the library from its own serialisation."""
    if doc["kind"] == "workspace":
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces.workspaces import internal

        return ws.Workspace._from_model(internal.View.model_validate(doc["spec"]))
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    model = internal.ReportViewspec.model_validate(doc["spec"])
    report = wr.Report._from_model(model)
    report.width = model.spec.width  # Report._from_model (0.4.13) leaves it at its default
    return report


def save(obj: Any, entity: str | None = None) -> str:
    """Save ``obj`` to W&B (online only; check :func:`offline_reason` first) and return its URL."""
    import wandb
    import wandb_workspaces.reports.v2 as wr

    try:
        obj.entity = entity or obj.entity or wandb.Api().default_entity
        if _kind(obj) == "report":  # the runsets' project, resolved by the API when the report is saved
            for block in obj.blocks:
                if isinstance(block, wr.PanelGrid):
                    for runset in block.runsets:
                        runset.entity = runset.entity or obj.entity
                        runset.project = runset.project or obj.project
        obj.save()
    except Exception as err:  # the library raises its own, wandb's and requests' errors
        raise MRLError(
            f"W&B did not save the {_kind(obj)} ({' '.join(str(err).split())[:300]}). If its runs are "
            "offline, upload them first (`wandb sync <run dir>`); check the entity and project."
        ) from None
    return obj.url
