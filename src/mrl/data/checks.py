"""Pre-flight checks of the data settings every datamodule shares (plain resolved nodes; the messages
follow :mod:`mrl.config_checks`). A key a datamodule does not take is refused by
:func:`mrl.config_checks.check_known_keys`."""

from __future__ import annotations

import math

from mrl.config_checks import Node, boolean, is_int, non_negative_int, number_in, positive_int, require

# Keys the datamodules share, with an example of a good value each.
DATA_POSITIVE = {
    "batch_size": "data.batch_size=256",
    "in_chans": "data.in_chans=3",
    "num_classes": "data.num_classes=10",
}
DATA_OPTIONAL_POSITIVE = {
    "eval_batch_size": "data.eval_batch_size=1000",
    "img_size": "data.img_size=224",
    "eval_img_size": "data.eval_img_size=256",
    "limit_train": "data.limit_train=2048",
    "limit_eval": "data.limit_eval=1000",
    "prefetch_factor": "data.prefetch_factor=2",
}
DATA_COUNTS = {
    "train_size": "data.train_size=512",
    "val_size": "data.val_size=5000",
    "test_size": "data.test_size=128",
    "crop_padding": "data.crop_padding=4",
}


def check_data(data: Node, prefix: str = "data.") -> None:
    for key, example in DATA_POSITIVE.items():
        positive_int(data, key, prefix, example)
    for key, example in DATA_OPTIONAL_POSITIVE.items():
        positive_int(data, key, prefix, example, optional=True)
    for key, example in DATA_COUNTS.items():
        non_negative_int(data, key, prefix, example)
    workers = data.get("num_workers", 0)
    auto = "decode" in data  # the encoded-image datamodules share the node's CPUs out themselves
    require(
        (is_int(workers) and workers >= 0) or (auto and workers == "auto"),
        f"{prefix}num_workers",
        workers,
        "a number of loader workers >= 0 (0: load in the training process)" + (" or 'auto'" if auto else ""),
        f"{prefix}num_workers=4",
    )
    number_in(data, "noise", prefix, 0, math.inf, f"{prefix}noise=1.0")
    for key in ("download", "in_memory", "pin_memory", "shuffle"):
        boolean(data, key, prefix)
