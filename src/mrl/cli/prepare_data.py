"""``mrl-prepare-data``: Hydra entry point of the shard conversion (``conf/prepare_data.yaml``)."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mrl.cli.common import check_output_location, report_user_errors
from mrl.config_path import config_dir
from mrl.logs import QUIET_LOGGERS
from mrl.resolvers import register_resolvers


def hydra_value(text: str) -> str:
    """``text`` as the value of a Hydra override: as it is where Hydra reads it back unchanged, else in
    quotes (Hydra refuses non-ASCII letters, ``=``, quotes, and splits ``a,b`` into a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for candidate in (text, _quoted(text)):
        try:
            if parser.parse_override(f"key={candidate}").value() == text:
                return candidate
        except HydraException:  # the lexer's errors too, not only the parser's
            continue
    return _quoted(text)


def _quoted(text: str) -> str:
    """``text`` in Hydra's quotes (double ones unless it holds some): the quote and the backslashes before a
    quote or at the end escaped by a backslash, as Hydra reads them."""
    quote = "'" if '"' in text and "'" not in text else '"'
    escaped = re.sub(rf"(\\*){quote}", lambda m: m.group(1) * 2 + "\\" + quote, text)
    return quote + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + quote


def next_command(out: Path | str) -> str:
    """The training command for the shards at ``out``, ready to paste into a shell."""
    return "mrl-train data=shards " + shlex.quote(f"data.input_dir={hydra_value(str(out))}")


@report_user_errors
def run(cfg: DictConfig) -> None:
    # LitData logs its cache settings at INFO once per worker; mrl's progress lines say what matters
    for name in ("litdata", *QUIET_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mrl.data.prepare import check_settings, prepare_shards  # heavy imports after Hydra's parsing
    from mrl.data.shards import is_remote
    from mrl.data.writer_group import Interrupted

    # every setting judged (unknown keys too: `+max_sid=500` would be ignored) before anything is read
    check_settings(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    try:
        out = prepare_shards(
            root=cfg.root,
            output_dir=cfg.output_dir,
            max_side=cfg.max_side,
            quality=cfg.quality,
            num_workers=cfg.num_workers,
            chunk_bytes=cfg.chunk_bytes,
            seed=cfg.seed,
        )
    except Interrupted as err:
        out = cfg.output_dir if is_remote(cfg.output_dir) else Path(cfg.output_dir).expanduser().absolute()
        print(
            f"\nError: mrl-prepare-data was stopped by {err.name}: its writer processes were ended and its "
            f"partial output removed, so nothing was written at {out}. Run the same command again to "
            "prepare the shards.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(err.exit_code)  # 128 + the signal, as shells report a command a signal ended
    print(f"Shards written to {out}", flush=True)
    print(f"Train from them with: {next_command(out)}", flush=True)


def main() -> None:
    register_resolvers()
    check_output_location(sys.argv, "no conversion started")  # Hydra's log dir, before Hydra makes it
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare_data")(run)()


if __name__ == "__main__":
    sys.exit(main())
