"""The report job behind ``mrl-report``: a sweep's jobs (methods x sizes) compared in Markdown, JSON,
a PNG and W&B (:mod:`mrl.cli.report` parses the command line)."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import yaml

from mrl.errors import MRLError

OUT_SUBDIR = "report"


def _sweep_wandb(jobs: list[Path]) -> dict:
    """Project, group and mode the sweep's jobs logged to W&B (empty when they did not use W&B)."""
    for job in jobs:
        config = yaml.safe_load((job / "resolved_config.yaml").read_text()) or {}
        node = (config.get("logger") or {}).get("wandb")
        if node and node.get("_target_"):
            return {
                "project": node.get("project") or "mrl",
                "entity": node.get("entity"),
                "group": node.get("group"),
                "offline": node.get("offline", True),
            }
    return {}


def report(args: argparse.Namespace) -> Path:
    from mrl.compare.claims import check_claims, claims_markdown
    from mrl.compare.collect import collect_jobs, find_jobs
    from mrl.compare.figure import write_figure
    from mrl.compare.quality_bytes import bytes_json, bytes_markdown
    from mrl.compare.table import aggregate, jobs_markdown, markdown, to_json

    if bool(args.sweep_dir) == bool(args.wandb_group):
        raise MRLError("Give mrl-report either a sweep directory or --wandb-group <group> (one of the two).")
    if args.wandb_report:
        from mrl.tracking.dashboards import require_workspaces

        require_workspaces()  # before the work, not after it
    infos: list = []
    if args.sweep_dir:
        root = Path(args.sweep_dir)
        records, infos = collect_jobs(root)
        wandb_target = _sweep_wandb(find_jobs(root))
        out = Path(args.out) if args.out else root / OUT_SUBDIR
        source = str(root)
    else:
        from mrl.compare.wandb_source import wandb_records

        records = wandb_records(args.wandb_group, args.project or "mrl", args.entity)
        wandb_target = {"project": args.project or "mrl", "group": args.wandb_group, "offline": False}
        out = Path(args.out) if args.out else Path(f"{OUT_SUBDIR}-{args.wandb_group}")
        source = f"W&B group {args.wandb_group}"
    if not records:
        raise MRLError(_nothing_measured(source, infos))
    tables = aggregate(records)
    claims = check_claims(tables)
    out.mkdir(parents=True, exist_ok=True)
    jobs_count = len(infos) or len({r.job for r in records})
    by_bytes = _quality_vs_bytes(root, out) if args.sweep_dir else None
    text = (
        f"Comparison of {jobs_count} jobs from {source}\n\n"
        + markdown(tables)
        + "\nClaims:\n\n"
        + claims_markdown(claims)
        + (("\n" + jobs_markdown(infos)) if infos else "")
        + (("\n" + bytes_markdown(*by_bytes[:2])) if by_bytes else "")
    )
    (out / "comparison.md").write_text(text)
    summary = {
        "source": source,
        "tables": to_json(tables),
        "claims": [asdict(c) for c in claims],
        "jobs": [asdict(i) for i in infos],
        **({"quality_vs_bytes": bytes_json(*by_bytes[:2])} if by_bytes else {}),
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = write_figure(tables, out / "comparison.png", args.title)
    run_dir = None
    if wandb_target and not args.no_wandb:
        run_dir = _log_wandb(wandb_target, tables, claims, infos, png, by_bytes)
    print(text)
    print(f"markdown: {out / 'comparison.md'}\nfigure:   {png}\njson:     {out / 'comparison.json'}")
    if by_bytes:
        print(f"bytes:    {by_bytes[2]}")
    if run_dir:
        print(f"W&B run:  {run_dir}  (upload with `wandb sync {shlex.quote(str(run_dir))}`)")
    if args.wandb_report:
        _wandb_report(args, wandb_target, records, (tables, claims, infos), out, source)
    return out


def _quality_vs_bytes(root: Path, out: Path) -> tuple | None:
    """Quality against bytes of the sweep's evaluations: ``(tables, best at each budget, figure)``,
    the figure written to ``out``; None when no job was evaluated."""
    from mrl.compare.quality_bytes import best_at_budgets, bytes_tables, collect_bytes, write_bytes_figure

    tables = bytes_tables(collect_bytes(root))
    if not any(tables.values()):
        return None
    return tables, best_at_budgets(tables), write_bytes_figure(tables, out / "quality_vs_bytes.png")


def _swept_overrides(jobs: list[Path]) -> list[str]:
    """The override keys whose values differ between the sweep's jobs (``head``, ``seed``, ...)."""
    from mrl.compare.collect import override_key, read_overrides

    per_job = [{override_key(o): o.partition("=")[2] for o in read_overrides(j)} for j in jobs]
    keys = sorted({k for overrides in per_job for k in overrides})
    return [k for k in keys if len({overrides.get(k) for overrides in per_job}) > 1]


def _wandb_report(
    args: argparse.Namespace, target: dict, records: list, results: tuple, out: Path, source: str
) -> None:
    """--wandb-report: the sweep's W&B report, saved (its URL printed) or, offline, its spec written."""
    from mrl.compare.claims import claims_markdown
    from mrl.compare.collect import changes_the_model, find_jobs
    from mrl.compare.table import METRIC_TITLES, jobs_markdown, markdown
    from mrl.tracking.dashboards.sweep import SweepInput, wandb_sweep_report

    tables, claims, infos = results
    if not target or not target.get("group"):
        raise MRLError(
            "--wandb-report needs the sweep's W&B runs, but its jobs ran without the W&B logger (or "
            "without a W&B group); rerun them with logger=wandb, or leave out --wandb-report."
        )
    jobs = find_jobs(Path(args.sweep_dir)) if args.sweep_dir else []
    outcome = wandb_sweep_report(
        SweepInput(
            project=args.project or target["project"],
            entity=args.entity or target.get("entity"),
            group=target["group"],
            out=out,
            title=args.title or f"MRL sweep {target['group']}",
            intro=f"Comparison of {len(infos) or len({r.job for r in records})} jobs from `{source}` "
            f"(W&B group `{target['group']}`), written by `mrl-report --wandb-report`.",
            tables=markdown(tables),
            claims=claims_markdown(claims),
            jobs=jobs_markdown(infos) if infos else "",
            points=[(r.method, r.seed, r.metric, r.size, r.value) for r in records],
            metric_titles={m: METRIC_TITLES.get(m, m) for m, t in tables.items() if t},
            runs_offline=bool(target.get("offline", True)),
            job_dirs=jobs,
            swept=_swept_overrides(jobs) if jobs else None,
            matters=changes_the_model,
        )
    )
    if outcome.url:
        print(f"W&B report: {outcome.url}", flush=True)
    else:
        print(
            f"W&B offline ({outcome.reason}): report not saved; its spec is in {outcome.spec} (after "
            f"`wandb sync` of the sweep's runs, online: mrl-dashboard --from-spec "
            f"{shlex.quote(str(outcome.spec))})",
            flush=True,
        )


def _nothing_measured(source: str, infos: list) -> str:
    """Why there is nothing to compare: which jobs lack what."""
    unfinished = [i.job for i in infos if not i.results]
    if infos and len(unfinished) == len(infos):
        return (
            f"None of the {len(infos)} jobs in {source} has finished: none holds a results.json (written "
            "when training ends). Wait for the sweep to finish, or see the jobs' logs for why they failed."
        )
    return (
        f"The jobs in {source} recorded no per-size metrics ({{test,val}}/acc@<size> in results.json, or an "
        "evaluation report); did they finish training?"
    )


def _log_wandb(
    target: dict, tables: dict, claims: list, infos: list, png: Path, by_bytes: tuple | None = None
) -> Path | None:
    """A summary run (job type ``report``) in the sweep's W&B group: one table per metric, the claims,
    the jobs and where their numbers came from, the figure, and quality against bytes (``by_bytes``:
    its tables, best lines and figure)."""
    import wandb

    from mrl.tracking.wandb_setup import wandb_credentials_available

    offline = target.get("offline", True) or not wandb_credentials_available()
    run = wandb.init(
        project=target["project"],
        group=target.get("group"),
        job_type="report",
        name="report",
        mode="offline" if offline else "online",
        dir=str(png.parent),
        reinit="finish_previous",
    )
    try:
        data = {}
        for metric, table in tables.items():
            rows = [[m, d, c.mean, c.std, c.n] for m, row in table.items() for d, c in sorted(row.items())]
            if rows:
                data[f"report/{metric}"] = wandb.Table(
                    columns=["method", "size", "mean", "std", "seeds"], data=rows
                )
        data["report/claims"] = wandb.Table(
            columns=["claim", "holds", "detail", "seed noise"],
            data=[[c.text, str(c.holds), c.detail, c.noise] for c in claims],
        )
        if infos:
            columns = list(asdict(infos[0]))
            data["report/jobs"] = wandb.Table(
                columns=columns, data=[[str(v) for v in asdict(i).values()] for i in infos]
            )
        data["report/comparison_png"] = wandb.Image(str(png))
        if by_bytes:
            from mrl.compare.quality_bytes import bytes_wandb

            data |= bytes_wandb(*by_bytes)
        run.log(data)
        run.summary.update(
            {
                f"report/{metric}/{m}@{d}": c.mean
                for metric, t in tables.items()
                for m, row in t.items()
                for d, c in row.items()
            }
        )
        return Path(run.dir).parent
    finally:
        wandb.finish()
