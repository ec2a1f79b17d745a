"""mrl's OmegaConf resolvers, registered by every command before it composes a config."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

from omegaconf import OmegaConf

from mrl.errors import MRLError


def register_resolvers() -> None:
    """``${mrl_uid:}``: a short random id, fixed for the whole config (cached), added to output dir
    names so that jobs started in the same second never share a directory."""
    if not OmegaConf.has_resolver("mrl_uid"):
        OmegaConf.register_new_resolver("mrl_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
    if not OmegaConf.has_resolver("mrl_linear_lr"):
        OmegaConf.register_new_resolver("mrl_linear_lr", linear_lr)
    if not OmegaConf.has_resolver("mrl_end_to_end_only"):
        OmegaConf.register_new_resolver("mrl_end_to_end_only", end_to_end_only)
    if not OmegaConf.has_resolver("mrl_eval_key"):
        OmegaConf.register_new_resolver(
            "mrl_eval_key", lambda *args: evaluation_key(evaluated_settings(*args))
        )


def linear_lr(base_lr: float, base_batch: int, batch_per_device: int, devices: int, nodes: int = 1) -> float:
    """``${mrl_linear_lr:base_lr,base_batch,batch,devices,nodes}``: the linear scaling rule (Goyal et al.),
    so a recipe tuned for one global batch keeps working on fewer or more GPUs. ``devices`` must be a
    count (a recipe that uses this sets ``trainer.devices`` explicitly, not -1)."""
    if int(devices) < 1 or int(nodes) < 1:
        raise MRLError(
            f"The learning rate scales with the number of GPUs, but trainer.devices={devices} and "
            f"trainer.num_nodes={nodes}; set trainer.devices=<number of GPUs per node>."
        )
    return float(base_lr) * int(batch_per_device) * int(devices) * int(nodes) / int(base_batch)


def end_to_end_only(source: Any, value: Any, otherwise: Any) -> Any:
    """``${mrl_end_to_end_only:${source},value,otherwise}``: ``value`` in an end-to-end run (``source``
    null), ``otherwise`` in a head trained on a frozen source's cached features (``source=``)."""
    return value if source is None else otherwise


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def absolute_paths(node: Any) -> Any:
    """``node`` with every string that names an existing relative path made absolute (a data setting
    such as ``input_dir=shards`` means another folder from another working directory)."""
    if isinstance(node, dict):
        return {str(k): absolute_paths(v) for k, v in node.items()}
    if isinstance(node, list):
        return [absolute_paths(v) for v in node]
    if (
        isinstance(node, str)
        and node
        and "://" not in node
        and not os.path.isabs(node)
        and os.path.exists(node)
    ):
        return os.path.abspath(node)
    return node


def evaluated_settings(
    database_split: Any, query_split: Any, sizes: Any, data: Any, embedding_dtype: Any, paper_head: Any
) -> dict[str, Any]:
    """What an ``mrl-eval`` evaluation measures besides the checkpoint (conf/eval.yaml's settings of the
    same names): the splits, the sizes (sorted), the data settings merged into the checkpoint's (relative
    paths made absolute), the embeddings' dtype and a paper checkpoint's head kind."""
    sizes = _plain(sizes)
    if isinstance(sizes, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in sizes):
        sizes = sorted(set(sizes))
    return {
        "database_split": str(database_split),
        "query_split": str(query_split),
        "sizes": sizes,
        "data": absolute_paths(_plain(data) or {}),
        "embedding_dtype": str(embedding_dtype),
        "paper_head": _plain(paper_head),
    }


def evaluation_key(settings: dict[str, Any]) -> str:
    """``<database split>-<query split>-<hash>``: the part of an evaluation's directory name that says
    what it evaluated besides the checkpoint (:func:`evaluated_settings`), the same in every process
    (``${mrl_eval_key:...}`` in conf/eval.yaml; :mod:`mrl.eval.locations`)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    splits = f"{settings['database_split']}-{settings['query_split']}"
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in splits) + f"-{digest}"
