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


def _variant(method: str, base: str) -> str | None:
    """The variant suffix (`` [w=4,2,1]``, `` [backbone.embed_dim=32]``) of ``method`` when it is ``base``
    or one of its variants, else None."""
    if method == base:
        return ""
    return method[len(base) :] if method.startswith(base + " [") else None


def _partner(tables: dict, metric: str, base: str, suffix: str) -> tuple[str, dict[int, Cell]]:
    """The comparison row for a variant: the same variant of ``base`` when the sweep has one, else the
    plain ``base`` row (an MRL loss-weight variant is compared with the one FF/SVD/slice there is)."""
    name = base + suffix
    if name in tables.get(metric, {}):
        return name, _row(tables, metric, name)
    return base, _row(tables, metric, base)


def check_claims(
    tables: dict,
    ff_tolerance: float = 1.0,
    mrl_e_tolerance: float = 2.0,
    mrl_e_min_size: int = 4,
    slice_margin: float = 20.0,
    svd_max_size: int = 8,
) -> list[Claim]:
    """Verdicts on: MRL vs FF at every size, MRL-E vs MRL, MRL vs truncation and vs PCA, 1-NN coverage.

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

        gaps = _gaps(mrl, ff, sorted(ff))
        claims.append(
            Claim(
                f"{label} top-1 within {ff_tolerance:g} point of FF at every size ({method} - {ff_name})",
                all(g >= -ff_tolerance for _, g in gaps) if gaps else None,
                _fmt(gaps),
            )
        )
        if mrl_e_name == "mrl_e" + suffix:  # MRL-E is compared with its own variant's MRL only
            gaps = _gaps(mrl_e, mrl, [d for d in sorted(mrl) if d >= mrl_e_min_size])
            claims.append(
                Claim(
                    f"MRL-E{suffix} top-1 within {mrl_e_tolerance:g} points of {label} at sizes >= "
                    f"{mrl_e_min_size} ({mrl_e_name} - {method})",
                    all(g >= -mrl_e_tolerance for _, g in gaps) if gaps else None,
                    _fmt(gaps),
                )
            )
        smallest = [d for d in sorted(mrl) if d in slice_][:2]
        gaps = _gaps(mrl, slice_, smallest)
        claims.append(
            Claim(
                f"{label} top-1 at least {slice_margin:g} points above truncation at the two smallest "
                f"sizes ({method} - {slice_name})",
                all(g >= slice_margin for _, g in gaps) if len(gaps) == 2 else None,
                _fmt(gaps),
            )
        )
        gaps = _gaps(mrl, svd, [d for d in sorted(mrl) if d <= svd_max_size])
        claims.append(
            Claim(
                f"{label} top-1 above PCA/SVD at every size up to {svd_max_size} ({method} - {svd_name})",
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
