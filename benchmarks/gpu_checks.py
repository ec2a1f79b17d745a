"""The GPU checks the CPU cannot make, in order of value, each in a process of its own under a time guard.

    python benchmarks/gpu_checks.py --out $OUT/gpu_checks.md   # on the GPU machine, after gpu_throughput.py
    python benchmarks/gpu_checks.py --quick --out /tmp/checks.md  # every check's --quick run, on the CPU

For a session lent a GPU (``../shared/gpu/README.md``: the bundle made with ``EXTRA="faiss-cpu==1.15.1"
bash ../shared/gpu/prepare.sh``, as mrl's evaluation modules import faiss, then ``source
.device/env.sh`` first on the GPU machine, from the repository root): the project's own
``gpu_throughput.py`` runs first, in its own call; this script then
spends what is left of ``--budget`` seconds on the checks of benchmarks/README.md's "Open" list, most
valuable first. A check starts only while its time guard fits in the budget; one that runs over is
stopped and marked so. Each check's whole output goes to ``<out stem>_<check>.txt``; ``--out`` gets one
table (check, command, exit status, seconds) and each check's last lines, to copy into
benchmarks/README.md with the date and the card.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
TAIL_LINES = 25


@dataclass(frozen=True)
class Check:
    """One benchmark run: its script, its arguments on the GPU, and its time guard in seconds."""

    name: str
    script: str
    args: tuple[str, ...]
    guard_s: int


CHECKS = (
    # evaluation at ImageNet's shape: every size's 100 nearest from one pass (target: under 2 minutes)
    Check(
        "eval_scale",
        "eval_scale.py",
        ("--device", "cuda", "--database", "1281167", "--queries", "50000", "--skip-faiss"),
        240,
    ),
    # a CSR model's sparse search: torch's CSR product on the GPU against scipy's on the CPU
    Check("sparse_search", "sparse_search.py", ("--device", "cuda"), 180),
    # the post-hoc heads' loss steps: CSR's decode rule and the prefix-cosine losses on the GPU
    Check("csr_step", "csr_step.py", ("--device", "cuda"), 90),
    Check("adaptor_step", "adaptor_step.py", ("--device", "cuda"), 90),
)


def run_check(check: Check, quick: bool, guard_s: float, log: Path) -> tuple[str, float]:
    """Run ``check`` (``--quick`` on the CPU with ``quick``) writing its output to ``log``; its exit
    status (or ``stopped after N s``) and seconds."""
    command = [sys.executable, str(BENCHMARKS / check.script), *(("--quick",) if quick else check.args)]
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                command, cwd=BENCHMARKS, stdout=out, stderr=subprocess.STDOUT, timeout=guard_s
            )
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"stopped after {guard_s:.0f} s"
    return status, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    """Run the checks; write the report; return ``(check, status)`` pairs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every check's --quick run, on the CPU")
    parser.add_argument("--budget", type=float, default=300, help="seconds for all the checks")
    parser.add_argument("--out", required=True, help="the report (markdown); logs beside it")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="these checks alone")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    rows, sections, statuses = [], [], []
    for check in [c for c in CHECKS if not args.only or c.name in args.only]:
        left = deadline - time.perf_counter()
        command = f"python benchmarks/{check.script} {'--quick' if args.quick else ' '.join(check.args)}"
        if left < (1 if args.quick else check.guard_s):
            rows.append(f"| {check.name} | `{command}` | skipped: {left:.0f} s of the budget left | |")
            statuses.append((check.name, "skipped"))
            continue
        log = out.with_name(f"{out.stem}_{check.name}.txt")
        status, seconds = run_check(check, args.quick, min(check.guard_s, left), log)
        print(f"{check.name}: {status} in {seconds:.0f} s ({log})", flush=True)
        rows.append(f"| {check.name} | `{command}` | {status} | {seconds:.0f} |")
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        sections.append(f"### {check.name}\n\n```\n{tail}\n```\n")
        statuses.append((check.name, status))
    table = ["| check | command | status | seconds |", "| --- | --- | --- | --- |", *rows]
    out.write_text("\n".join(["## GPU checks", "", *table, "", *sections]))
    print(f"report: {out}")
    return statuses


if __name__ == "__main__":
    main()
