"""Whether a training step may read a value back to the host: the one place this is decided."""

from __future__ import annotations

import torch


def host_reads_are_free(device: torch.device) -> bool:
    """Whether a value may be read back to the host (``bool(t)``, ``.item()``) in a training step on
    ``device``: on the CPU it is already there; on an accelerator the host would wait for the device's
    queue to drain at every step. Callers look it up through this module (``host_reads.host_reads_are_free``)
    so that tests/training/test_no_host_sync.py can run a CPU training step with it set to False and count
    the host reads left in mrl's code."""
    return device.type == "cpu"
