"""mrl: Matryoshka representation learning on Lightning, Hydra, timm and W&B."""

from mrl.errors import MRLError
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.matryoshka_loss import MatryoshkaLoss
from mrl.nn.nesting import default_nesting, validate_nesting

__all__ = ["MRLError", "MatryoshkaLinear", "MatryoshkaLoss", "default_nesting", "validate_nesting"]
__version__ = "0.1.0"
