"""The deployment API: load a trained model without Hydra and embed images at any Matryoshka size.

``mrl.load(path)`` (:mod:`.loading`) reads a checkpoint written by ``mrl-train`` (``.ckpt``), the
one-file export ``model.safetensors`` that ``mrl-eval`` writes beside its report (or
:meth:`MatryoshkaModel.save`), or a checkpoint of the paper's repository. The export is
self-describing: its safetensors metadata holds the model's description
(:class:`~mrl.models.spec.ModelSpec`: backbone, head, sizes, class count, eval preprocessing) as JSON,
its tensors are the backbone and head weights. :mod:`.model` is the model, :mod:`.preprocessing` turns
raw images into its inputs.

    model = mrl.load("logs/eval/runs/<job>_last/model.safetensors")
    z = model.embed(images, dim=64)          # (B, 64), L2-normalised
    classes = model.predict(images, dim=64)  # the size-64 classifier's argmax
"""

from mrl.deploy.loading import load
from mrl.deploy.model import FORMAT, FORMAT_VERSION, METADATA_KEY, MatryoshkaModel
from mrl.models.spec import NONE, TIMM, UINT8

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_KEY", "NONE", "TIMM", "UINT8", "MatryoshkaModel", "load"]
