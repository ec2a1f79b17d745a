"""``mrl-prepare-data``: Hydra entry point of the shard conversion (``conf/prepare_data.yaml``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from mrl.cli.common import check_output_location, report_user_errors
from mrl.config_path import config_dir
from mrl.resolvers import register_resolvers


@report_user_errors
def run(cfg: DictConfig) -> None:
    # LitData logs its cache settings at INFO once per worker; its progress bar says what matters
    logging.getLogger("litdata").setLevel(logging.WARNING)
    from mrl.data.prepare import check_settings, prepare_shards  # heavy imports after Hydra's parsing

    # every setting judged (unknown keys too: `+max_sid=500` would be ignored) before anything is read
    check_settings(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    out = prepare_shards(
        root=cfg.root,
        output_dir=cfg.output_dir,
        max_side=cfg.max_side,
        quality=cfg.quality,
        num_workers=cfg.num_workers,
        chunk_bytes=cfg.chunk_bytes,
        seed=cfg.seed,
    )
    print(f"Shards written to {out}", flush=True)
    print(f"Train from them with: mrl-train data=shards data.input_dir={out}", flush=True)


def main() -> None:
    register_resolvers()
    check_output_location(sys.argv, "no conversion started")  # Hydra's log dir, before Hydra makes it
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare_data")(run)()


if __name__ == "__main__":
    sys.exit(main())
