"""mrl: Matryoshka representation learning on Lightning, Hydra, timm and W&B."""

from typing import TYPE_CHECKING, Any

from mrl.errors import MRLError
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.nesting import default_nesting, validate_nesting
from mrl.version import __version__

if TYPE_CHECKING:
    from mrl.deploy import MatryoshkaModel, load

__all__ = [
    "MRLError",
    "MatryoshkaLinear",
    "MatryoshkaLoss",
    "MatryoshkaModel",
    "__version__",
    "default_nesting",
    "load",
    "validate_nesting",
]

# The deployment API needs timm (and safetensors): imported on first use, so `import mrl` and
# `from mrl import MatryoshkaLinear` stay light.
_LAZY = {"load": "mrl.deploy", "MatryoshkaModel": "mrl.deploy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrl' has no attribute {name!r}")
