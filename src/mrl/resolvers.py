"""mrl's OmegaConf resolvers, registered by every command before it composes a config."""

from __future__ import annotations

import uuid

from omegaconf import OmegaConf

from mrl.errors import MRLError


def register_resolvers() -> None:
    """``${mrl_uid:}``: a short random id, fixed for the whole config (cached), added to output dir
    names so that jobs started in the same second never share a directory."""
    if not OmegaConf.has_resolver("mrl_uid"):
        OmegaConf.register_new_resolver("mrl_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
    if not OmegaConf.has_resolver("mrl_linear_lr"):
        OmegaConf.register_new_resolver("mrl_linear_lr", linear_lr)


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
