"""Where the Hydra configs are: the checkout's ``conf/`` or, in an installed wheel, ``mrl/conf``."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]


def config_dir() -> str:
    """Absolute path of the primary config directory.

    In a checkout (editable install) the configs at the repository root are used, so edits take
    effect without reinstalling; a wheel carries a copy inside the package (see pyproject.toml).
    """
    checkout = REPO_ROOT / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    packaged = PACKAGE_DIR / "conf"
    if (packaged / "train.yaml").is_file():
        return str(packaged)
    raise FileNotFoundError(f"mrl configs not found in {checkout} or {packaged}; reinstall the package")
