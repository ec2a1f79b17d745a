"""Where the Hydra configs are: the checkout's ``conf/`` or, in an installed wheel, ``mrl/conf``."""

from __future__ import annotations

from pathlib import Path

from mrl.resolvers import register_resolvers

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]


def config_dir() -> str:
    """Absolute path of the primary config directory; mrl's OmegaConf resolvers, which these configs use
    (``checkpoint_every_n_steps: ${mrl_end_to_end_only:...}``), are registered on the way, so any code that
    composes them from this path (Hydra's compose API, tests, benchmarks) can resolve them.

    In a checkout (editable install) the configs at the repository root are used, so edits take
    effect without reinstalling; a wheel carries a copy inside the package (see pyproject.toml).
    """
    register_resolvers()
    checkout = REPO_ROOT / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    packaged = PACKAGE_DIR / "conf"
    if (packaged / "train.yaml").is_file():
        return str(packaged)
    raise FileNotFoundError(f"mrl configs not found in {checkout} or {packaged}; reinstall the package")
