"""mrl-report: one comparison of a sweep's jobs (methods x sizes): Markdown, JSON, PNG and W&B.

mrl-report logs/train/multiruns/<date>_<id>          # a multirun directory
mrl-report --wandb-group <group> [--project mrl]      # the same sweep read back from W&B (online)
mrl-report <sweep dir> --wandb-report [--project P --entity E]   # also build the sweep's W&B report

Top-1 comes from each job's results.json; 1-NN, mAP@10 and the post-hoc baselines from the newest
evaluation of the job's checkpoints (mrl-train evaluate=..., or mrl-eval ckpt_path=<job>/checkpoints/...).
The report lists every job and where its numbers came from; a claim lacking numbers is "not measured".
--wandb-report builds a W&B report of the sweep (accuracy-vs-size charts per metric, methods as lines,
seeds aggregated; tables; claims; swept settings vs validation accuracy; run comparer) and prints its URL;
offline it says so and writes the spec it would save to <out>/wandb_report.json (save it later, online
and after `wandb sync` of the runs, with `mrl-dashboard --from-spec <that file>`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mrl.cli.common import fail
from mrl.compare.job import OUT_SUBDIR, report
from mrl.errors import MRLError
from mrl.files import unwritable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrl-report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "sweep_dir",
        nargs="?",
        help="a multirun directory, or any folder of mrl-train job dirs (searched recursively)",
    )
    p.add_argument("--wandb-group", help="read the sweep from this W&B group instead (needs network)")
    p.add_argument(
        "--project",
        default=None,
        help="W&B project (default: the one the jobs logged to; mrl with --wandb-group)",
    )
    p.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    p.add_argument(
        "--out", help=f"output folder (default: <sweep_dir>/{OUT_SUBDIR}, or ./{OUT_SUBDIR}-<group>)"
    )
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--no-wandb", action="store_true", help="do not write the W&B summary run")
    p.add_argument(
        "--wandb-report",
        action="store_true",
        help="build the sweep's W&B report (offline: write its spec to <out>/wandb_report.json)",
    )
    return p


def check_out(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    if args.out:
        out = Path(args.out)
    elif args.sweep_dir and Path(args.sweep_dir).is_dir():
        out = Path(args.sweep_dir) / OUT_SUBDIR
    elif args.wandb_group:
        out = Path(f"{OUT_SUBDIR}-{args.wandb_group}")
    else:
        return  # no sweep there: report() says so
    if out.exists() and not out.is_dir():
        raise MRLError(
            f"--out {out} is a file, but mrl-report writes a folder (comparison.md, comparison.json, "
            "figures and the W&B summary run). Give --out a folder: a new one, or one mrl-report wrote."
        )
    problem = unwritable(out)
    if problem:
        raise MRLError(
            f"Cannot write the report into {out}: {problem}. Give --out <a folder you can write>; nothing "
            "was written."
        )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_out(args)
        report(args)
    except MRLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(err), hint=None)  # not a Hydra app: no HYDRA_FULL_ERROR hint


if __name__ == "__main__":
    sys.exit(main())
