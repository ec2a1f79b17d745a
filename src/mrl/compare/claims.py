"""The paper's claims, checked on a comparison table (numbers in percent, means over seeds).

The thresholds are arguments (defaults: the claims the Fashion-MNIST comparison is meant to test), so
the verdicts come from the measured table and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from mrl.compare.table import Cell


@dataclass(frozen=True)
class Claim:
    text: str
    holds: bool | None  # None: the sweep lacks the methods/sizes to decide
    detail: str


def _row(tables: dict, metric: str, method: str) -> dict[int, Cell]:
    return tables.get(metric, {}).get(method, {})


def _gaps(a: dict[int, Cell], b: dict[int, Cell], sizes) -> list[tuple[int, float]]:
    return [(d, a[d].mean - b[d].mean) for d in sizes if d in a and d in b]


def _fmt(gaps: list[tuple[int, float]]) -> str:
    return ", ".join(f"d={d}: {g:+.2f}" for d, g in gaps)


def check_claims(
    tables: dict,
    ff_tolerance: float = 1.0,
    mrl_e_tolerance: float = 2.0,
    mrl_e_min_size: int = 4,
    slice_margin: float = 20.0,
    svd_max_size: int = 8,
) -> list[Claim]:
    """Verdicts on: MRL vs FF at every size, MRL-E vs MRL, MRL vs truncation and vs PCA, 1-NN coverage."""
    mrl, mrl_e, ff = (_row(tables, "top1", m) for m in ("mrl", "mrl_e", "ff"))
    slice_, svd = _row(tables, "top1", "slice"), _row(tables, "top1", "svd")
    claims = []

    gaps = _gaps(mrl, ff, sorted(ff))
    claims.append(
        Claim(
            f"MRL top-1 within {ff_tolerance:g} point of FF at every size (MRL - FF)",
            all(g >= -ff_tolerance for _, g in gaps) if gaps else None,
            _fmt(gaps),
        )
    )
    gaps = _gaps(mrl_e, mrl, [d for d in sorted(mrl) if d >= mrl_e_min_size])
    claims.append(
        Claim(
            f"MRL-E top-1 within {mrl_e_tolerance:g} points of MRL at sizes >= {mrl_e_min_size} "
            "(MRL-E - MRL)",
            all(g >= -mrl_e_tolerance for _, g in gaps) if gaps else None,
            _fmt(gaps),
        )
    )
    smallest = [d for d in sorted(mrl) if d in slice_][:2]
    gaps = _gaps(mrl, slice_, smallest)
    claims.append(
        Claim(
            f"MRL top-1 at least {slice_margin:g} points above truncation at the two smallest sizes "
            "(MRL - slice)",
            all(g >= slice_margin for _, g in gaps) if len(gaps) == 2 else None,
            _fmt(gaps),
        )
    )
    gaps = _gaps(mrl, svd, [d for d in sorted(mrl) if d <= svd_max_size])
    claims.append(
        Claim(
            f"MRL top-1 above PCA/SVD at every size up to {svd_max_size} (MRL - SVD)",
            all(g > 0 for _, g in gaps) if gaps else None,
            _fmt(gaps),
        )
    )
    top1_methods = set(tables.get("top1", {}))
    nn_methods = set(tables.get("1nn", {}))
    missing = sorted(top1_methods - nn_methods)
    claims.append(
        Claim(
            "1-NN accuracy reported for every method",
            not missing if top1_methods else None,
            f"missing for {missing}" if missing else f"{len(nn_methods)} methods",
        )
    )
    return claims


def claims_markdown(claims: list[Claim]) -> str:
    verdict = {True: "holds", False: "**does not hold**", None: "not decidable from this sweep"}
    return "\n".join(f"- {c.text}: {verdict[c.holds]} ({c.detail})" for c in claims) + "\n"
