"""The paper's claims, checked on a comparison table (numbers in percent, means over seeds).

Each claim's text states the inequality it checks, per size, on the difference of the two rows' means
(``mrl - ff >= -1``), and the check is exactly that. The paper's claims are one-sided: a nested or
tied model costs at most so much accuracy against the model it replaces, or gains at least so much
over a post-hoc reduction; being better than that is not a failure. Sizes where one of the two rows
has no number are listed as not measured; a claim with no size measured for both is "not measured"
(``holds=None``), never "does not hold". The thresholds are arguments (defaults: the claims the
Fashion-MNIST comparison is meant to test), so the verdicts come from the measured table and nothing
else. Where the means miss a claim's bound, the claim also says whether the miss is larger than the
seeds' noise (Welch's t-test on the seeds' numbers, :mod:`mrl.compare.significance`): a verdict on
means of a few seeds is only as firm as their spread allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mrl.compare.significance import exceeds_noise, p_value, welch
from mrl.compare.table import Cell


@dataclass(frozen=True)
class Claim:
    text: str
    holds: bool | None  # None: not measured (the sweep lacks the rows or sizes to decide)
    detail: str
    # at each size where the means miss the bound: is the miss larger than the seeds' noise (Welch)?
    noise: str = ""


Row = dict[int, Cell]


def _row(tables: dict, metric: str, method: str) -> Row:
    return tables.get(metric, {}).get(method, {})


def _noise(d: int, a: Cell, b: Cell, bound: float) -> str:
    """Where ``a - b`` misses ``bound``: the gap with its standard error and Welch's test against no
    difference and against the bound, and what that says (a real miss, or within the seeds' noise)."""
    against_zero, against_bound = welch(a.values, b.values), welch(a.values, b.values, delta=bound)
    if against_zero is None or against_bound is None:
        return f"d={d}: fewer than 2 seeds on a side, no noise estimate"
    if exceeds_noise(against_bound):
        verdict = "misses the bound by more than the seeds' noise"
    elif exceeds_noise(against_zero):
        verdict = "a gap beyond the seeds' noise, but not distinguishable from the bound"
    else:
        verdict = "within the seeds' noise (neither the bound nor no difference is excluded)"
    return (
        f"d={d}: {against_zero.gap:+.2f} ± {against_zero.se:.2f} (standard error, Welch df "
        f"{against_zero.df:.1f}), {p_value(against_zero.p)} against no difference, "
        f"{p_value(against_bound.p)} against {bound:+g}: {verdict}"
    )


def _check(
    text: str,
    a: tuple[str, Row],
    b: tuple[str, Row],
    sizes: list[int],
    bound: float,
    strict: bool = False,
    need_all: bool = False,
) -> Claim:
    """``a - b >= bound`` (``> bound`` when ``strict``) at every size of ``sizes`` where both rows (name,
    cells) have a number; ``need_all``: the claim is about exactly these sizes, so any one not measured
    leaves it undecided. Each size that misses the bound gets a Welch test of the miss (``noise``)."""
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
    missed = [d for d, g in gaps if not (g > bound if strict else g >= bound)]
    noise = "; ".join(_noise(d, a_row[d], b_row[d], bound) for d in missed)
    return Claim(text, not missed if decided else None, "; ".join(details), noise)


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


def _baseline(name: str) -> str:
    """Which model a post-hoc baseline row reduces: ``slice [x]`` and ``svd [x]`` come from the
    ``standard [x]`` jobs of the same variant (so a reader sees e.g. the linear-embedding or the plain
    ReLU-feature standard model)."""
    variant = name[name.index(" [") :] if " [" in name else ""
    return f"of the standard{variant} model"


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
                -ff_tolerance,
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
                    -mrl_e_tolerance,
                )
            )
        claims.append(
            _check(
                f"{label} top-1 at least {_points(slice_margin)} above truncation ({_baseline(slice_name)}) "
                f"at its two smallest sizes ({method} - {slice_name} >= {slice_margin:g})",
                (method, mrl),
                (slice_name, slice_),
                sorted(mrl)[:2],
                slice_margin,
                need_all=True,
            )
        )
        claims.append(
            _check(
                f"{label} top-1 above PCA/SVD ({_baseline(svd_name)}) at each size <= {svd_max_size} "
                f"({method} - {svd_name} > 0)",
                (method, mrl),
                (svd_name, svd),
                [d for d in sorted(set(mrl) | set(svd)) if d <= svd_max_size],
                0.0,
                strict=True,
            )
        )
    return _once(claims)


def without_variants(text: str) -> str:
    """``text`` without its row variants (`` [head.nesting=[4,8],seed=1]``, brackets nested or not)."""
    out, depth = [], 0
    for i, c in enumerate(text):
        if c == "[" and (depth or text[i - 1 : i] == " "):
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
    return " ".join("".join(out).split()).replace(" )", ")")


def _once(claims: list[Claim]) -> list[Claim]:
    """Each claim stated once: a claim that cannot be measured for one MRL row for the same reason as for
    another (the sweep has no FF row at all) is one line about MRL, not one per variant."""
    out, seen = [], set()
    for claim in claims:
        if claim.holds is None and claim.detail.endswith(" not measured"):  # a row absent, not sizes
            claim = Claim(without_variants(claim.text), None, without_variants(claim.detail))
            if (claim.text, claim.detail) in seen:
                continue
            seen.add((claim.text, claim.detail))
        out.append(claim)
    return out


VERDICTS = {True: "holds", False: "**does not hold**", None: "not measured"}


def claims_markdown(claims: list[Claim]) -> str:
    """One line per claim: its text, verdict and per-size gaps; where it misses, whether the miss is
    larger than the seeds' noise."""
    return (
        "\n".join(
            f"- {c.text}: {VERDICTS[c.holds]} ({c.detail})" + (f"; seed noise: {c.noise}" if c.noise else "")
            for c in claims
        )
        + "\n"
    )
