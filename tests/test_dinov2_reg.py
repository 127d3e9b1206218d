"""DINOv2 with registers (arch=dinov2_reg): official-layout files (register_tokens, a 1 + 37²
position embedding) load strictly, and the features equal the official model's, whose position
embedding is resampled by size with antialiasing, at every input size; the project's DINOv2
resampling would be wrong here."""

import pytest
import torch

from official_layouts import (
    dinov2_reg_official_features,
    dinov2_reg_official_state_dict,
    image,
    rel_l2,
    shallow_backbone,
)
from smooseg.errors import SmoosegError
from smooseg.model.backbone import use_official_pos_embed
from smooseg.model.backbones import POS_SIZE_ANTIALIAS
from smooseg.model.weights import load_official_state_dict, official_weights


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    shapes = shallow_backbone("dinov2_reg", "vit_small", 14, pretrained=False)
    sd = dinov2_reg_official_state_dict(shapes)
    path = tmp_path_factory.mktemp("w") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    loaded = shallow_backbone("dinov2_reg", "vit_small", 14, pretrained=True, weights_path=path)
    return sd, loaded


@pytest.mark.parametrize("size", [(224, 224), (322, 322), (448, 448), (224, 350)])
def test_features_equal_the_official_computation(official, size):
    """224, 320 (a 23 x 23 grid, as fit=resize makes of it), 448 and a non-square size."""
    sd, backbone = official
    img = image(*size, seed=size[0] + size[1])
    expected = dinov2_reg_official_features(backbone.model, sd, img)
    assert backbone(img).shape == expected.shape == (1, 384, size[0] // 14, size[1] // 14)
    assert rel_l2(backbone(img), expected) <= 1e-5


def test_320_px_resizes_to_the_23_grid(official):
    sd, backbone = official
    assert backbone.fit == "resize"
    img = image(320, 320, seed=3)
    resized = torch.nn.functional.interpolate(img, size=(322, 322), mode="bilinear", align_corners=False)
    assert rel_l2(backbone(img), dinov2_reg_official_features(backbone.model, sd, resized)) <= 1e-5


@pytest.mark.parametrize("size", [224, 448])
def test_the_dinov2_resampling_would_be_wrong_here(official, size):
    """The DINOv2 override (scale factor + 0.1, no antialias) is not what the reg4 models do."""
    sd, backbone = official
    assert backbone.pos_embed_policy == POS_SIZE_ANTIALIAS
    wrong = shallow_backbone("dinov2_reg", "vit_small", 14, pretrained=False)
    wrong.load_state_dict(backbone.state_dict())
    use_official_pos_embed(wrong.model)
    img = image(size, size, seed=size)
    assert rel_l2(wrong(img), dinov2_reg_official_features(backbone.model, sd, img)) > 1e-3


def test_layout_and_files(official):
    sd, backbone = official
    assert torch.equal(backbone.model.reg_token, sd["register_tokens"])
    assert torch.allclose(backbone.model.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])
    assert official_weights("dinov2_reg", "vit_large", 14) == (
        "dinov2_vitl14_reg4_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")
    plain_dinov2 = {k: v for k, v in sd.items() if k != "register_tokens"}
    with pytest.raises(SmoosegError, match=r"f\.pth.*(missing keys reg_token|pos_embed)"):
        load_official_state_dict(backbone, plain_dinov2, "f.pth")
    other_grid = dict(sd, pos_embed=torch.zeros(1, 1 + 16 * 16, 384))
    with pytest.raises(SmoosegError, match=r"f\.pth.*pos_embed"):
        load_official_state_dict(backbone, other_grid, "f.pth")
