"""The deployment API on a CSR model (head=csr): ``embed(x, dim=k)`` is the size-k sparse code, not a
prefix, and ``logits(x, dim=k)`` its size-k classifier; checked against plain references written here,
through an export and ``mrl.load``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mrl
from mrl.deploy import NONE, MatryoshkaModel
from mrl.errors import MRLError
from mrl.models.spec import FeatureHead, ModelSpec, Preprocessing

SIZES = (2, 4, 8)
FEATURES, EXPANSION = 16, 3  # the source's (projected) features; the code's units: 48


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny CSR model (random weights: no training needed), exported and loaded back."""
    spec = ModelSpec(
        backbone="test_byobnet",
        num_classes=5,
        in_chans=3,
        img_size=16,
        projection_dim=FEATURES,
        head="csr",
        nesting=SIZES,
        preprocessing=Preprocessing(NONE, 3, 16),
        feature_head=FeatureHead("csr", FEATURES, {"expansion": EXPANSION}),
    )
    torch.manual_seed(0)
    path = MatryoshkaModel(spec).save(tmp_path_factory.mktemp("csr") / "model.safetensors")
    return mrl.load(path)


def reference_code(z: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest entries (others 0)."""
    out = np.zeros_like(z)
    for row, code in zip(z, out, strict=True):
        top = np.argsort(-row, kind="stable")[:k]
        code[top] = np.maximum(row[top], 0)
    return out


def test_embed_gives_the_size_k_sparse_code(exported):
    model = exported
    assert model.sparse and model.embed_dim == FEATURES * EXPANSION and model.nesting == list(SIZES)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        z = model(x).numpy()  # the stored embedding: the code of the largest k
        features = model.backbone.source(x)
    assert ((z != 0).sum(1) <= SIZES[-1]).all()
    for k in (1, *SIZES, 5):  # any k up to the largest, trained or not
        code = model.embed(x, dim=k)
        assert code.shape == (6, FEATURES * EXPANSION) and ((code != 0).sum(1) <= k).all()
        expected = reference_code(z, k)
        expected /= np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
        np.testing.assert_allclose(code.numpy(), expected, rtol=1e-5, atol=1e-7)
        # nested top-k sets: the same code as the sparse autoencoder's own at this k
        own = F.normalize(model.backbone.feature_head.encode(features, k), dim=1)
        torch.testing.assert_close(code, own.detach())
        np.testing.assert_allclose(
            model.embed(x, dim=k, normalize=False).numpy(), reference_code(z, k), rtol=1e-6
        )
    assert ((model.embed(x) != 0).sum(1) <= SIZES[-1]).all()  # default: the largest k


def test_logits_are_the_size_k_classifier_on_the_size_k_code(exported):
    model = exported
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        z = model(x).numpy()
        all_sizes = model.head(torch.from_numpy(z))  # (G, B, C): what training and mrl-eval compute
    hidden = FEATURES * EXPANSION
    for g, k in enumerate(SIZES):
        weight = model.head.weight.detach().numpy()[:, g * hidden : (g + 1) * hidden]
        expected = reference_code(z, k) @ weight.T + model.head.bias.detach().numpy()[g]
        logits = model.logits(x, dim=k)
        np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, all_sizes[g])
        assert torch.equal(model.predict(x, dim=k), logits.argmax(-1))
    torch.testing.assert_close(model.logits(x), all_sizes[-1])


def test_sizes_beyond_the_largest_k_are_refused(exported):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(MRLError, match=r"at most 8 active units .* Pass dim= between 1 and 8"):
        exported.embed(x, dim=9)
    with pytest.raises(MRLError, match=r"not 5\. .* embed\(\) works at any size 1\.\.8"):
        exported.logits(x, dim=5)
