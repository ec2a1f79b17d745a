"""mrl-dashboard: (re)create the project's W&B workspace, or save a dashboard spec written offline.

mrl-dashboard --project mrl [--entity team]      # the workspace, from the keys the project's runs logged
mrl-dashboard --from-spec wandb_workspace_mrl.json  # save a spec written offline (workspace or report)

The workspace's sections, in this order: every size's top-1 curve in one chart per stage (train, val),
the final accuracy per size, the loss per size, top-5, the learning rate, the system; sizes in numeric
order. Its panels name only keys the runs logged: read from the run directories under --runs
(`wandb leet inspect`), or from the W&B server when none is there. Offline (no network or no W&B
credentials) it says so and writes the exact spec it would save to --out; after `wandb sync` of the
runs, `mrl-dashboard --from-spec <that file>` on a machine online creates it. Prints the URL once saved.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from mrl.cli.common import fail
from mrl.errors import MRLError
from mrl.files import unwritable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-dashboard", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--project", help="W&B project whose workspace to build")
    p.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    p.add_argument(
        "--runs",
        default=None,
        help="folder searched for the project's W&B run directories (default: $MRL_LOG_DIR or ./logs)",
    )
    p.add_argument("--name", default="", help="the workspace's name (default: 'mrl: <project>, ...')")
    p.add_argument(
        "--out",
        default=None,
        help="spec file written offline, or a folder for it (default: ./wandb_workspace_<project>.json)",
    )
    p.add_argument("--from-spec", default=None, help="save this spec file (written offline) to W&B")
    return p


def _runs(args: argparse.Namespace, reason: str | None) -> list:
    from mrl.tracking.dashboards.keys import local_runs, server_runs

    root = Path(args.runs or os.environ.get("MRL_LOG_DIR") or "logs")
    runs = local_runs(root, args.project) if root.is_dir() else []
    if not runs and reason is None:
        try:
            runs = server_runs(args.project, args.entity)
        except Exception as err:  # wandb raises its own and requests' errors for network and auth failures
            raise MRLError(f"Cannot read the runs of W&B project {args.project!r} ({err}).") from None
    if not runs:
        where = f"under {root}" + ("" if reason else " nor on the W&B server")
        raise MRLError(
            f"No runs of W&B project {args.project!r} {where}: the workspace's panels are built from the "
            "keys the runs logged. Give --runs <folder holding the jobs' wandb/ directories>, or check "
            "--project (mrl-train logs to logger.wandb.project, default mrl)."
        )
    return runs


def from_spec(path: str, entity: str | None) -> str:
    from mrl.tracking.dashboards.spec import from_document, offline_reason, read_document, save

    doc = read_document(path)
    obj = from_document(doc)
    reason = offline_reason()
    if reason:
        raise MRLError(f"W&B is offline ({reason}): {path} can only be saved online; run this again there.")
    url = save(obj, entity or doc.get("entity"))
    print(f"W&B {doc['kind']}: {url}", flush=True)
    return url


def spec_file(args: argparse.Namespace) -> Path:
    """The spec file written offline: ``--out`` (a folder: the default name in it), checked writable."""
    name = f"wandb_workspace_{args.project}.json"
    out = Path(args.out or name)
    if out.is_dir():
        out = out / name
    problem = unwritable(out.parent)
    if problem:
        raise MRLError(
            f"Cannot write the workspace spec {out}: {problem}. Give --out <a file or folder you can write>."
        )
    return out


def dashboard(args: argparse.Namespace) -> Path | str:
    """The URL of the saved workspace, or (offline) the path of the spec file written."""
    from mrl.tracking.dashboards import require_workspaces

    require_workspaces()
    if bool(args.project) == bool(args.from_spec):
        raise MRLError("Give mrl-dashboard either --project <W&B project> or --from-spec <spec file>.")
    if args.from_spec:
        return from_spec(args.from_spec, args.entity)
    from mrl.tracking.dashboards.spec import document, offline_reason, save, write_document
    from mrl.tracking.dashboards.workspace import project_workspace

    reason = offline_reason()
    out = spec_file(args) if reason else None  # judged before the runs are read
    runs = _runs(args, reason)
    workspace = project_workspace(runs, args.project, args.entity or "", args.name)
    if out is None:
        url = save(workspace, args.entity)
        print(f"W&B workspace: {url}", flush=True)
        return url
    doc = document(workspace, "mrl-dashboard", runs_read=len(runs))
    write_document(doc, out)
    print(
        f"W&B offline ({reason}): workspace not saved; its spec is in {out} "
        f"(after `wandb sync` of the runs, online: mrl-dashboard --from-spec {shlex.quote(str(out))})",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        dashboard(args)
    except MRLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(err), hint=None)


if __name__ == "__main__":
    sys.exit(main())
