"""Nesting lists: the embedding prefix sizes a Matryoshka model is trained (and evaluated) at."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from mrl.errors import MRLError


def default_nesting(embed_dim: int, min_size: int = 8) -> list[int]:
    """Powers of two from ``min_size`` up to ``embed_dim``, plus ``embed_dim`` itself.

    ``default_nesting(2048)`` is the paper's list 8, 16, ..., 2048; ``default_nesting(96, 1)`` is
    1, 2, 4, ..., 64, 96.
    """
    if embed_dim < 1:
        raise MRLError(f"The embedding size must be a positive integer, got {embed_dim}.")
    sizes = []
    size = max(1, int(min_size))
    while size < embed_dim:
        sizes.append(size)
        size *= 2
    sizes.append(embed_dim)
    return sizes


def validate_nesting(nesting: Sequence[int], embed_dim: int | None = None) -> list[int]:
    """Return ``nesting`` as a list of ints, or raise :class:`MRLError` saying how to fix it.

    A nesting list must be non-empty, strictly increasing, made of positive integers, and its largest
    size must not exceed the embedding size (when known).
    """
    try:
        sizes = [int(m) for m in nesting]
        ok_types = all(float(m) == int(m) for m in nesting)
    except (TypeError, ValueError):
        sizes, ok_types = [], False
    if not ok_types or not sizes:
        raise MRLError(
            f"head.nesting must be a non-empty list of positive integers, got {list(nesting)!r}. "
            "Pass it as a list, for example head.nesting=[8,16,32,64]."
        )
    if any(m < 1 for m in sizes):
        raise MRLError(
            f"head.nesting holds a size below 1: {sizes}. Every prefix size must be a positive integer, "
            "for example head.nesting=[8,16,32,64]."
        )
    if any(b <= a for a, b in pairwise(sizes)):
        raise MRLError(
            f"head.nesting must be strictly increasing, got {sizes}. Sort it and drop duplicates, "
            f"for example head.nesting=[{','.join(map(str, sorted(set(sizes))))}]."
        )
    if embed_dim is not None and sizes[-1] > embed_dim:
        raise MRLError(
            f"head.nesting goes up to {sizes[-1]} but the embedding has only {embed_dim} features. "
            f"Lower the largest size to at most {embed_dim}, or learn a larger embedding with "
            f"backbone.embed_dim={sizes[-1]} (a linear projection after the backbone)."
        )
    return sizes
