"""The generic pre-flight checks of settings: value predicates and the standard messages every feature's
checks use (each feature's own checks live beside it: ``mrl.models.checks``, ``mrl.data.checks``,
``mrl.training.checks``, the evaluators of ``mrl.eval``).

Each function takes plain resolved config nodes (dicts and lists, no Hydra or OmegaConf objects) and
raises an :class:`MRLError` naming the key, the value and what to write instead. The commands call them
before they create output or start training (see :mod:`mrl.preflight`), so a typo costs seconds, not
a training run. This module imports nothing of mrl but its errors, so every layer can use it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mrl.errors import MRLError

Node = Mapping[str, Any]
# a size setting that means the embedding size (adaptive_retrieval's rerank sizes, optimized_metric's @full)
FULL = "full"


# ---- value predicates ---------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, value: Any, what: str, example: str) -> None:
    """Raise the standard message for ``key=value`` when ``ok`` is false: what the key takes, an example."""
    if not ok:
        raise MRLError(f"{key}={value!r} is not valid: {key} must be {what}. For example {example}.")


def positive_int(node: Node, key: str, prefix: str, example: str, optional: bool = False) -> None:
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    require(is_int(value) and value > 0, f"{prefix}{key}", value, "a positive integer", example)


def non_negative_int(node: Node, key: str, prefix: str, example: str, optional: bool = False) -> None:
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    require(is_int(value) and value >= 0, f"{prefix}{key}", value, "an integer >= 0", example)


def boolean(node: Node, key: str, prefix: str) -> None:
    if key in node:
        require(
            isinstance(node[key], bool), f"{prefix}{key}", node[key], "true or false", f"{prefix}{key}=true"
        )


def number_in(
    node: Node, key: str, prefix: str, low: float, high: float, example: str, optional: bool = False
):
    """``low <= node[key] <= high`` (``high`` may be ``inf``)."""
    if key not in node or (optional and node[key] is None):
        return
    value = node[key]
    bounds = f"a number >= {low}" if math.isinf(high) else f"a number from {low} to {high}"
    require(is_number(value) and low <= value <= high, f"{prefix}{key}", value, bounds, example)


def int_list(node: Node, key: str, prefix: str, example: str, allow_full: bool = False) -> None:
    """A non-empty list of positive integers (``full``: the embedding size, where allowed)."""
    if key not in node or node[key] is None:
        return
    value = node[key]
    ok = isinstance(value, list | tuple) and bool(value)
    ok = ok and all((is_int(v) and v > 0) or (allow_full and v == FULL) for v in value)
    what = "a list of positive integers" + (" (or 'full')" if allow_full else "")
    require(ok, f"{prefix}{key}", value, what, example)


def one_of(node: Node, key: str, prefix: str, choices: Sequence[Any]) -> None:
    if key not in node:
        return
    value = node[key]
    if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not true here
        names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]  # as written in YAML
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise MRLError(f"{prefix}{key}={value!r} is not valid: {prefix}{key} must be {listed}.")


def mapping(node: Any, key: str, example: str) -> Node:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise MRLError(
            f"{key}={node!r} is not valid: {key} must be a group of settings. For example {example}."
        )
    return node


# ---- component keys -------------------------------------------------------------------------------


def accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments the class ``target`` (an ``mrl.`` component) accepts, following ``**kwargs``
    up its base classes; None when it cannot be told (not ours, or open-ended)."""
    if not target.startswith("mrl."):
        return None
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    keys: set[str] = set()
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
    return None


def check_known_keys(node: Node, key: str, extra: Node | None = None, how: str = "") -> None:
    """Refuse keys of ``extra`` (overrides merged into ``node``, default: ``node`` itself) that the
    component ``node['_target_']`` does not take, naming the valid ones."""
    target = node.get("_target_")
    valid = accepted_keys(str(target)) if target else None
    if valid is None:
        return
    if extra is not None:  # the stored node's own keys were accepted when it was built
        valid |= {k for k in node if not str(k).startswith("_")}
    unknown = sorted(
        k for k in (node if extra is None else extra) if not str(k).startswith("_") and k not in valid
    )
    if unknown:
        raise MRLError(
            f"{key} has no setting {', '.join(repr(k) for k in unknown)} ({target} does not take it){how}. "
            f"The valid {key} keys are: {', '.join(sorted(valid))}."
        )
