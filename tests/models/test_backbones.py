"""Backbones from several timm families: built by name, pooled size measured, trained a step."""

import pytest
import torch

from mrl import MatryoshkaLinear, MatryoshkaLoss
from mrl.errors import MRLError
from mrl.models.backbone import TimmBackbone

FAMILIES = [
    ("resnet18", 32, 512),
    ("convnext_atto", 32, 320),
    ("vit_tiny_patch16_224", 32, 192),
    # MobileNetV3 has a head projection after pooling: its features are not num_features (576).
    ("mobilenetv3_small_050", 32, 1024),
]


@pytest.mark.parametrize(("name", "img_size", "dim"), FAMILIES)
def test_family_builds_and_trains(name, img_size, dim):
    torch.manual_seed(0)
    backbone = TimmBackbone(name, in_chans=3, img_size=img_size)
    assert backbone.embed_dim == dim
    head = MatryoshkaLinear(dim, 5, [8, 16, dim])
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    x, y = torch.randn(4, 3, img_size, img_size), torch.randint(0, 5, (4,))
    loss = MatryoshkaLoss()(head(backbone(x)), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())


def test_projection_to_embed_dim():
    backbone = TimmBackbone("resnet18", in_chans=1, img_size=28, embed_dim=2048)
    assert backbone.feature_dim == 512 and backbone.embed_dim == 2048
    assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, 2048)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(MRLError, match=r"Did you mean: .*convnext_atto"):
        TimmBackbone("convnext_atoo")


def test_pretrained_needs_local_weights(tmp_path):
    with pytest.raises(MRLError, match="does not exist"):
        TimmBackbone("resnet18", pretrained_path=str(tmp_path / "missing.safetensors"))


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = TimmBackbone("resnet18", in_chans=3)
    path = tmp_path / "resnet18.pth"
    torch.save(
        {**source.model.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path
    )
    loaded = TimmBackbone("resnet18", in_chans=3, pretrained_path=str(path))
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_build_with_upsizing_picks_the_smallest_accepted_size():
    from mrl.models.backbone import ImageTooSmallError, build_with_upsizing

    tried = []

    def build(size: int, minimum: int = 64):
        tried.append(size)
        if size < minimum:
            raise ImageTooSmallError(f"{size} px is too small")
        return f"model@{size}"

    assert build_with_upsizing(build, 28, resizable=True) == ("model@64", 64)
    assert tried == [28, 32, 64]
    assert build_with_upsizing(build, 96, resizable=True) == ("model@96", 96)  # fits: no resize
    with pytest.raises(ImageTooSmallError, match="28 px"):
        build_with_upsizing(build, 28, resizable=False)
    with pytest.raises(ImageTooSmallError, match="28 px"):  # nothing fits: the first error
        build_with_upsizing(lambda s: build(s, minimum=1000), 28, resizable=True)
