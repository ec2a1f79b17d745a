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

HEAD_KINDS = ("mrl", "mrl_e", "ff", "standard")


def head_nesting(
    kind: str, embed_dim: int, nesting: Sequence[int] | None = None, min_size: int = 8, dim: int | None = None
) -> list[int]:
    """The sizes a head of ``kind`` is trained at, validated against the embedding size."""
    if kind not in HEAD_KINDS:
        raise MRLError(f"Unknown head kind '{kind}'. Choose one of {', '.join(HEAD_KINDS)} (head=<kind>).")
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
) -> MatryoshkaLinear:
    """A :class:`MatryoshkaLinear` configured as the head ``kind`` (training, evaluation and the
    deployment API all build heads here)."""
    sizes = head_nesting(kind, embed_dim, nesting, min_size, dim)
    return MatryoshkaLinear(embed_dim, num_classes, sizes, efficient=kind == "mrl_e", bias=bias, fused=fused)
