"""DINOv3 backbones (arch=dinov3): official-layout files load strictly and give the official
model's features at every input size; each of the three pitfalls (timm's plain variant, the
regenerated RoPE periods, the k bias) is caught; gated weights; SAT-493M normalisation."""

import pytest
import timm
import torch

from official_layouts import (
    dinov3_official_features,
    dinov3_official_state_dict,
    image,
    rel_l2,
    shallow_backbone,
)
from smooseg.errors import SmoosegError
from smooseg.model.backbones import IMAGENET_MEAN, IMAGENET_STD, SAT_MEAN, SAT_STD, backbone_spec
from smooseg.model.weights import load_official_state_dict, official_weights

HEADS = 6  # ViT-S


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official-layout state dict, path of it saved, a Backbone loaded from that file)."""
    torch.manual_seed(0)
    shapes = shallow_backbone("dinov3", "vit_small", 16, pretrained=False)
    sd = dinov3_official_state_dict(shapes)
    path = tmp_path_factory.mktemp("w") / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    loaded = shallow_backbone("dinov3", "vit_small", 16, pretrained=True, weights_path=path)
    return sd, path, loaded


@pytest.mark.parametrize("size", [(224, 224), (320, 320), (448, 448), (224, 352)])
def test_features_equal_the_official_computation(official, size):
    sd, _, backbone = official
    img = image(*size, seed=size[0] + size[1])
    expected = dinov3_official_features(sd, img, HEADS)
    assert backbone(img).shape == expected.shape == (1, 384, size[0] // 16, size[1] // 16)
    assert rel_l2(backbone(img), expected) <= 1e-5


def test_kk_keys_before_rope_with_masked_k_bias(official):
    sd, _, backbone = official
    img = image(64, 96, seed=5)
    backbone.feat_type = "KK"
    try:
        keys = backbone(img)
    finally:
        backbone.feat_type = "feat"
    expected = dinov3_official_features(sd, img, HEADS, keys=True)
    assert rel_l2(keys, expected) <= 1e-5
    masked = dict(sd)
    masked["blocks.1.attn.qkv.bias_mask"] = torch.ones_like(sd["blocks.1.attn.qkv.bias_mask"])
    assert rel_l2(dinov3_official_features(masked, img, HEADS, keys=True), expected) > 1e-3


def test_file_periods_are_copied_in_fp32(official):
    sd, _, backbone = official
    periods = backbone.model.rope.periods
    assert periods.dtype == torch.float32 and torch.equal(periods, sd["rope_embed.periods"].float())
    regenerated = shallow_backbone("dinov3", "vit_small", 16, pretrained=False).model.rope.periods
    assert not torch.equal(periods, regenerated)  # bf16 rounding is what the file holds


def test_periods_survive_a_checkpoint_round_trip(official):
    """The periods are in the state dict, so a net rebuilt from a checkpoint keeps them."""
    _, _, backbone = official
    assert "model.rope.periods" in backbone.state_dict()
    rebuilt = shallow_backbone("dinov3", "vit_small", 16, pretrained=False)
    rebuilt.load_state_dict(backbone.state_dict())
    img = image(64, 80, seed=4)
    assert torch.equal(rebuilt(img), backbone(img))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rebuilt.model.rope.get_embed(shape=(4, 5)).dtype == torch.float32


def test_without_the_periods_copy_features_drift(official):
    """timm's regenerated fp32 periods give measurably other features than the file's."""
    sd, _, backbone = official
    img = image(448, 448, seed=1)
    expected = dinov3_official_features(sd, img, HEADS)
    ours = rel_l2(backbone(img), expected)
    regen = shallow_backbone("dinov3", "vit_small", 16, pretrained=False)
    weights = {k: v for k, v in backbone.state_dict().items() if not k.endswith("rope.periods")}
    assert regen.load_state_dict(weights, strict=False).missing_keys == ["model.rope.periods"]
    drift = rel_l2(regen(img), expected)
    assert ours < drift / 10 and drift > 1e-6


def test_timm_plain_variant_drops_the_biases(official):
    """timm's non-qkvb DINOv3 has no q / v biases: with the release's non-zero biases it is far
    off, which is why the spec names the qkvb variant."""
    sd, _, backbone = official
    assert backbone.spec.timm_model.endswith("_dinov3_qkvb")
    with torch.no_grad():
        plain = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, depth=2)
    from timm.models.eva import checkpoint_filter_fn

    plain.load_state_dict(checkpoint_filter_fn(dict(sd), plain), strict=True)
    img = image(224, 224, seed=2)
    with torch.no_grad():
        tokens = plain.forward_features(img)[:, 5:]
    feats = tokens.transpose(1, 2).reshape(1, 384, 14, 14)
    assert rel_l2(feats, dinov3_official_features(sd, img, HEADS)) > 1e-2


def test_bad_bias_mask_and_foreign_files_are_refused(official, tmp_path):
    sd, _, backbone = official
    bad = dict(sd)
    bad["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    with pytest.raises(SmoosegError, match=r"blocks\.0\.attn\.qkv\.bias_mask.*\[1, 0, 1\]"):
        load_official_state_dict(backbone, bad, "f.pth")
    short = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(SmoosegError, match=r"f\.pth.*missing keys norm\.weight"):
        load_official_state_dict(backbone, short, "f.pth")
    patch8 = dict(sd, **{"patch_embed.proj.weight": torch.zeros(384, 3, 8, 8)})
    with pytest.raises(SmoosegError, match=r"patch_embed\.proj\.weight \(384, 3, 8, 8\)"):
        load_official_state_dict(backbone, patch8, "f.pth")


def test_swiglu_and_sat_layouts_load_strictly(tmp_path):
    """ViT-S+ (SwiGLU w1/w2/w3) and the SAT-493M ViT-L (local_cls_norm) official layouts."""
    for model_type, data, swiglu in (("vit_small_plus", None, True), ("vit_large", "sat493m", False)):
        fresh = shallow_backbone("dinov3", model_type, 16, pretrained=False, weights_data=data, depth=1)
        sd = dinov3_official_state_dict(fresh, swiglu=swiglu, sat=data == "sat493m")
        assert ("blocks.0.mlp.w1.weight" in sd) == swiglu
        load_official_state_dict(fresh, sd, "f.pth")
        assert torch.equal(fresh.model.reg_token, sd["storage_tokens"])
        assert torch.equal(fresh.model.blocks[0].attn.q_bias, sd["blocks.0.attn.qkv.bias"].chunk(3)[0])


def test_sat_weights_renormalise_the_input():
    """SAT-493M expects its own mean / std: an ImageNet-normalised input is mapped so that the
    features equal those of the raw image normalised with the SAT statistics."""
    torch.manual_seed(0)
    sat = shallow_backbone("dinov3", "vit_large", 16, pretrained=False, weights_data="sat493m", depth=1)
    lvd = shallow_backbone("dinov3", "vit_large", 16, pretrained=False, depth=1)
    lvd.load_state_dict(sat.state_dict())
    raw = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    def normalised(mean, std):
        return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    expected = lvd(normalised(SAT_MEAN, SAT_STD))
    assert rel_l2(sat(normalised(IMAGENET_MEAN, IMAGENET_STD)), expected) <= 1e-5
    assert rel_l2(lvd(normalised(IMAGENET_MEAN, IMAGENET_STD)), expected) > 1e-2
    assert not hasattr(lvd, "renorm_scale")
    assert "renorm_scale" not in sat.state_dict()  # checkpoints keep their keys


def test_releases_files_and_gated_download(tmp_path, monkeypatch):
    assert official_weights("dinov3", "vit_small", 16) == (
        "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        "https://dl.fbaipublicfiles.com/dinov3/dinov3_vits16/dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    files = {(t, d): official_weights("dinov3", t, 16, d)[0]
             for t, d in (("vit_large", "sat493m"), ("vit_small_plus", None), ("vit_huge_plus", None))}
    assert files == {("vit_large", "sat493m"): "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth",
                     ("vit_small_plus", None): "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
                     ("vit_huge_plus", None): "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"}
    with pytest.raises(SmoosegError, match="weights_data=sat493m.*vit_small.*lvd1689m"):
        backbone_spec("dinov3", "vit_small", 16).release("sat493m")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SmoosegError) as err:
        shallow_backbone("dinov3", "vit_base", 16, pretrained=True, depth=1)
    msg = str(err.value)
    assert "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" in msg and "gated" in msg and "\n" not in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "weights_url" in msg
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists()


def test_timm_source_reads_the_hugging_face_cache(official, tmp_path, monkeypatch):
    """weights_source=timm: timm's own layout, from the HF cache (a missing copy is one line)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(SmoosegError, match=r"timm/vit_small_patch16_dinov3_qkvb\.lvd1689m.*hf download"):
        shallow_backbone("dinov3", "vit_small", 16, pretrained=True, weights_source="timm")
    _, _, backbone = official
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"  # timm's files hold no periods
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items() if k != "rope.periods"},
              str(path))
    timm_copy = shallow_backbone("dinov3", "vit_small", 16, pretrained=True, weights_source="timm",
                                 weights_path=path)
    img = image(64, 64)
    assert torch.equal(timm_copy.model.blocks[1].attn.q_bias, backbone.model.blocks[1].attn.q_bias)
    assert torch.equal(timm_copy.model.rope.periods, shallow_backbone(
        "dinov3", "vit_small", 16, pretrained=False).model.rope.periods)  # timm's fp32 ones
    assert 0 < rel_l2(timm_copy(img), backbone(img)) < 1e-4
