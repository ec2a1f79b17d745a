"""Build the head a config names: ``mrl``, ``mrl_e``, ``ff`` or ``standard``.

All four are a :class:`MatryoshkaLinear`; they differ in their nesting list and weight tying:

* ``mrl``: untied classifiers on every prefix of the nesting list;
* ``mrl_e``: one tied classifier evaluated on every prefix;
* ``ff``: the paper's fixed-feature baseline, one classifier on the first ``dim`` features only
  (sweep ``head.dim`` to train the FF family);
* ``standard``: one classifier on the full embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

from mrl.errors import MRLError
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.nesting import default_nesting, validate_nesting
from mrl.nn.sparse_code_linear import SparseCodeLinear

HEAD_KINDS = ("mrl", "mrl_e", "ff", "standard")
# Heads that only train on a frozen source's features (mrl-train source=...): CSR's sparse codes, whose
# sizes are numbers of active units k, and the Matryoshka-Adaptor, whose sizes are prefixes.
FROZEN_SOURCE_KINDS = ("csr", "adaptor")
ALL_HEAD_KINDS = (*HEAD_KINDS, *FROZEN_SOURCE_KINDS)
# CSR's k values when head.nesting is null: powers of two from 8 (its paper's smallest) to 256
DEFAULT_CSR_SIZES = (8, 16, 32, 64, 128, 256)


def head_nesting(
    kind: str, embed_dim: int, nesting: Sequence[int] | None = None, min_size: int = 8, dim: int | None = None
) -> list[int]:
    """The sizes a head of ``kind`` is trained at, validated against the embedding size (for ``csr``, the
    code's number of units)."""
    if kind not in ALL_HEAD_KINDS:
        raise MRLError(
            f"Unknown head kind '{kind}'. Choose one of {', '.join(ALL_HEAD_KINDS)} (head=<kind>)."
        )
    if kind == "csr" and nesting is None:
        return validate_nesting([k for k in DEFAULT_CSR_SIZES if k <= embed_dim] or [embed_dim], embed_dim)
    if kind == "standard":
        return [embed_dim]
    if kind == "ff":
        if dim is None:
            raise MRLError("head=ff needs the feature size it classifies from: set head.dim=<d>.")
        if int(dim) > embed_dim:  # the FF head's one size is head.dim, not a head.nesting entry
            raise MRLError(
                f"head.dim={dim} but the embedding has only {embed_dim} features: head=ff classifies from "
                f"the first head.dim of them. Lower head.dim to at most {embed_dim}, or learn a larger "
                f"embedding with backbone.embed_dim={dim} (a linear projection after the backbone)."
            )
        return validate_nesting([dim], embed_dim)
    if nesting is None:
        return default_nesting(embed_dim, min_size)
    return validate_nesting(nesting, embed_dim)


def build_head(
    kind: str,
    embed_dim: int,
    num_classes: int,
    nesting: Sequence[int] | None = None,
    min_size: int = 8,
    dim: int | None = None,
    bias: bool = True,
    fused: bool = True,
) -> MatryoshkaLinear | SparseCodeLinear:
    """A :class:`MatryoshkaLinear` configured as the head ``kind`` (training, evaluation and the
    deployment API all build heads here); for ``csr`` a :class:`SparseCodeLinear` on the codes."""
    sizes = head_nesting(kind, embed_dim, nesting, min_size, dim)
    if kind == "csr":
        return SparseCodeLinear(embed_dim, num_classes, sizes, bias=bias)
    return MatryoshkaLinear(embed_dim, num_classes, sizes, efficient=kind == "mrl_e", bias=bias, fused=fused)
