"""The paper's claims, checked on a comparison table (numbers in percent, means over seeds).

Each claim's text states the inequality it checks, per size, on the difference of the two rows' means
(``mrl - ff >= -1``), and the check is exactly that. The paper's claims are one-sided: a nested or
tied model costs at most so much accuracy against the model it replaces, or gains at least so much
over a post-hoc reduction; being better than that is not a failure. Sizes where one of the two rows
has no number are listed as not measured; a claim with no size measured for both is "not measured"
(``holds=None``), never "does not hold". The thresholds are arguments (defaults: the claims the
Fashion-MNIST comparison is meant to test), so the verdicts come from the measured table and nothing
else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mrl.compare.table import Cell


@dataclass(frozen=True)
class Claim:
    text: str
    holds: bool | None  # None: not measured (the sweep lacks the rows or sizes to decide)
    detail: str


Row = dict[int, Cell]


def _row(tables: dict, metric: str, method: str) -> Row:
    return tables.get(metric, {}).get(method, {})


def _check(
    text: str,
    a: tuple[str, Row],
    b: tuple[str, Row],
    sizes: list[int],
    ok: Callable[[float], bool],
    need_all: bool = False,
) -> Claim:
    """``ok(a - b)`` at every size of ``sizes`` where both rows (name, cells) have a number; ``need_all``:
    the claim is about exactly these sizes, so any one not measured leaves it undecided."""
    a_row, b_row = a[1], b[1]
    absent = [name for name, row in (a, b) if not row]
    if absent:
        return Claim(text, None, " and ".join(absent) + " not measured")
    gaps = [(d, a_row[d].mean - b_row[d].mean) for d in sizes if d in a_row and d in b_row]
    unmeasured = [d for d in sizes if d not in a_row or d not in b_row]
    details = [", ".join(f"d={d}: {g:+.2f}" for d, g in gaps)] if gaps else []
    if unmeasured:
        details.append("not measured at " + ", ".join(f"d={d}" for d in unmeasured))
    decided = bool(gaps) and not (need_all and unmeasured)
    return Claim(text, all(ok(g) for _, g in gaps) if decided else None, "; ".join(details))


def _variant(method: str, base: str) -> str | None:
    """The variant suffix (`` [w=4,2,1]``, `` [backbone.embed_dim=32]``) of ``method`` when it is ``base``
    or one of its variants, else None."""
    if method == base:
        return ""
    return method[len(base) :] if method.startswith(base + " [") else None


def _partner(tables: dict, metric: str, base: str, suffix: str) -> tuple[str, Row]:
    """The comparison row for a variant: the same variant of ``base`` when the sweep has one, else the
    plain ``base`` row (an MRL loss-weight variant is compared with the one FF/SVD/slice there is)."""
    name = base + suffix
    if name in tables.get(metric, {}):
        return name, _row(tables, metric, name)
    return base, _row(tables, metric, base)


def _points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def check_claims(
    tables: dict,
    ff_tolerance: float = 1.0,
    mrl_e_tolerance: float = 2.0,
    mrl_e_min_size: int = 4,
    slice_margin: float = 20.0,
    svd_max_size: int = 8,
) -> list[Claim]:
    """Verdicts on top-1: MRL vs FF at every size, MRL-E vs MRL, MRL vs truncation and vs PCA.

    Every MRL row is checked: the plain ``mrl`` one and each variant (``mrl [w=4,2,1,...]`` for a
    run with relative-importance weights, ``mrl [<override>]`` for a sweep's variant), each against
    its own variant of FF/SVD/slice when the sweep has one, else against the plain rows.
    """
    claims = []
    mrl_rows = [m for m in tables.get("top1", {}) if _variant(m, "mrl") is not None] or ["mrl"]
    for method in sorted(mrl_rows, key=lambda m: (m != "mrl", m)):
        suffix = _variant(method, "mrl") or ""
        label = "MRL" + suffix
        mrl = _row(tables, "top1", method)
        ff_name, ff = _partner(tables, "top1", "ff", suffix)
        mrl_e_name, mrl_e = _partner(tables, "top1", "mrl_e", suffix)
        slice_name, slice_ = _partner(tables, "top1", "slice", suffix)
        svd_name, svd = _partner(tables, "top1", "svd", suffix)

        claims.append(
            _check(
                f"{label} top-1 at most {_points(ff_tolerance)} below FF at each size "
                f"({method} - {ff_name} >= -{ff_tolerance:g})",
                (method, mrl),
                (ff_name, ff),
                sorted(set(mrl) | set(ff)),
                lambda g: g >= -ff_tolerance,
            )
        )
        if mrl_e_name == "mrl_e" + suffix:  # MRL-E is compared with its own variant's MRL only
            claims.append(
                _check(
                    f"MRL-E{suffix} top-1 at most {_points(mrl_e_tolerance)} below {label} at each size "
                    f">= {mrl_e_min_size} ({mrl_e_name} - {method} >= -{mrl_e_tolerance:g})",
                    (mrl_e_name, mrl_e),
                    (method, mrl),
                    [d for d in sorted(set(mrl) | set(mrl_e)) if d >= mrl_e_min_size],
                    lambda g: g >= -mrl_e_tolerance,
                )
            )
        claims.append(
            _check(
                f"{label} top-1 at least {_points(slice_margin)} above truncation at its two smallest "
                f"sizes ({method} - {slice_name} >= {slice_margin:g})",
                (method, mrl),
                (slice_name, slice_),
                sorted(mrl)[:2],
                lambda g: g >= slice_margin,
                need_all=True,
            )
        )
        claims.append(
            _check(
                f"{label} top-1 above PCA/SVD at each size <= {svd_max_size} ({method} - {svd_name} > 0)",
                (method, mrl),
                (svd_name, svd),
                [d for d in sorted(set(mrl) | set(svd)) if d <= svd_max_size],
                lambda g: g > 0,
            )
        )
    return claims


VERDICTS = {True: "holds", False: "**does not hold**", None: "not measured"}


def claims_markdown(claims: list[Claim]) -> str:
    return "\n".join(f"- {c.text}: {VERDICTS[c.holds]} ({c.detail})" for c in claims) + "\n"
