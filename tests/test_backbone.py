"""Tests for the frozen ViT backbone (SPEC section 1): shapes, features, freezing, weights."""

import functools
import http.server
import socket
import threading

import pytest
import timm
import torch
from torch import nn

from smooseg import backbone as bb
from smooseg.backbone import ARCHS, Backbone, load_official_state_dict, official_weights, timm_name
from smooseg.errors import SmoosegError

WIDTH = {"vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant": 1536}


def _split(key):
    arch, model_type, patch = key.split("/")
    return arch, model_type, int(patch)


@pytest.fixture
def shallow(monkeypatch):
    """Build timm ViTs with ``depth`` blocks (real width/heads/patch) to keep CPU time low."""
    built = []
    original = timm.create_model

    def create(name, depth=1, **kwargs):
        built.append(name)
        return original(name, depth=depth, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    return built


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return Backbone("dino", "vit_small", 16, pretrained=False)


def _img(h, w, b=1, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_names_and_official_files():
    assert timm_name("dino", "vit_small", 8) == "vit_small_patch8_224.dino"
    assert timm_name("dino", "vit_base", "16") == "vit_base_patch16_224.dino"
    assert timm_name("dinov2", "vit_giant", 14) == "vit_giant_patch14_dinov2.lvd142m"
    assert official_weights("dino", "vit_small", 8) == (
        "dino_deitsmall8_300ep_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth")
    assert official_weights("dinov2", "vit_large", 14) == (
        "dinov2_vitl14_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth")
    for bad in [("dino", "vit_large", 8), ("dinov2", "vit_small", 16), ("mae", "vit_small", 8)]:
        with pytest.raises(SmoosegError, match="dino/vit_small/8.*dinov2/vit_giant/14"):
            timm_name(*bad)
    with pytest.raises(SmoosegError, match="feat_type"):
        Backbone("dino", "vit_small", 16, feat_type="QQ", pretrained=False)
    with pytest.raises(SmoosegError, match="fit"):
        Backbone("dino", "vit_small", 16, fit="crop", pretrained=False)


@pytest.mark.parametrize("key", list(ARCHS))
def test_shapes_every_arch(shallow, key):
    """Every supported arch at 224 and 320 px (DINOv2 at 320 via resize and pad: 23 x 23)."""
    arch, model_type, patch = _split(key)
    C = WIDTH[model_type]
    b = Backbone(arch, model_type, patch, pretrained=False)
    assert shallow == [ARCHS[key]]
    assert b.n_feats == C and b.patch_size == patch
    assert b(_img(224, 224)).shape == (1, C, 224 // patch, 224 // patch)
    if patch == 14:
        with pytest.raises(SmoosegError, match="patch size 14"):
            b(_img(320, 320))
        for fit in ("resize", "pad"):
            b.fit = fit
            assert b(_img(320, 320)).shape == (1, C, 23, 23)
    else:
        assert b(_img(320, 320)).shape == (1, C, 320 // patch, 320 // patch)
    kk = Backbone(arch, model_type, patch, pretrained=False, feat_type="KK", fit="resize")
    assert kk(_img(320, 224)).shape[1:] == (C, round(320 / patch), 224 // patch)


def test_fit_policies(shallow):
    b = Backbone("dino", "vit_small", 16, pretrained=False)
    with pytest.raises(SmoosegError, match=r"33x40.*patch size 16.*fit=resize.*fit=pad"):
        b(_img(33, 40))
    b.fit = "resize"
    assert b(_img(33, 40)).shape[-2:] == (2, 3)  # 33/16 = 2.06 -> 2; 40/16 = 2.5 rounds up -> 3
    assert b(_img(8, 57)).shape[-2:] == (1, 4)  # at least one patch; 57/16 = 3.56 -> 4
    b.fit = "pad"
    x = _img(33, 40)
    out = b(x)
    assert out.shape[-2:] == (3, 3)
    padded = torch.zeros(1, 3, 48, 48)
    padded[..., :33, :40] = x
    b.fit = "error"
    assert torch.equal(out, b(padded))


def test_feature_is_last_block_through_final_norm(vits16):
    x = _img(32, 48, b=2)
    feat = vits16(x)
    assert feat.shape == (2, 384, 2, 3) and feat.dtype == torch.float32 and feat.is_contiguous()
    with torch.no_grad():
        tokens = vits16.model.forward_features(x)[:, vits16.model.num_prefix_tokens:]
    expected = tokens.reshape(2, 2, 3, 384).permute(0, 3, 1, 2)
    assert torch.allclose(feat, expected, atol=1e-6)
    # the map is laid out row-major: token (row 1, col 2) is the last patch token
    assert torch.allclose(feat[:, :, 1, 2], tokens[:, -1], atol=1e-6)


def test_autocast_gives_float32(vits16):
    x = _img(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vits16(x)
    assert out.dtype == torch.float32 and out.shape == (1, 384, 2, 2)
    assert torch.allclose(out, vits16(x), atol=0.3)


def test_kk_keys_by_hand(vits16):
    x = _img(32, 48, b=2, seed=1)
    m = vits16.model
    feat = vits16(x)
    vits16.feat_type = "KK"
    try:
        keys = vits16(x)
    finally:
        vits16.feat_type = "feat"
    assert keys.shape == feat.shape == (2, 384, 2, 3)
    assert not torch.allclose(keys, feat, atol=1e-3)
    with torch.no_grad():
        spatial, prefix = m.forward_intermediates(
            x, indices=[len(m.blocks) - 2], norm=False, output_fmt="NLC",
            return_prefix_tokens=True, intermediates_only=True)[0]
        block_in = torch.cat([prefix, spatial], dim=1)
        y = m.blocks[-1].norm1(block_in)
        w, bias = m.blocks[-1].attn.qkv.weight, m.blocks[-1].attn.qkv.bias
        k = y @ w[384:768].T + bias[384:768]
    expected = k[:, 1:].reshape(2, 2, 3, 384).permute(0, 3, 1, 2)
    assert torch.allclose(keys, expected, atol=1e-5)


def test_frozen_and_eval(vits16):
    assert all(not p.requires_grad for p in vits16.parameters())
    vits16.train()
    try:
        assert vits16.training
        assert all(not m.training for m in vits16.model.modules())
        x = _img(32, 32)
        torch.manual_seed(1)
        a = vits16(x)
        torch.manual_seed(2)
        assert torch.equal(a, vits16(x))
        head = nn.Conv2d(384, 4, 1)
        feat = vits16(x)
        assert not feat.requires_grad and feat.grad_fn is None
        assert vits16(x.clone().requires_grad_(True)).grad_fn is None
        head(feat).square().mean().backward()
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in vits16.parameters())
    finally:
        vits16.eval()


def test_fused_attn_toggle(shallow):
    torch.manual_seed(0)
    fused = Backbone("dino", "vit_small", 16, pretrained=False, fused_attn=True)
    plain = Backbone("dino", "vit_small", 16, pretrained=False, fused_attn=False)
    plain.load_state_dict(fused.state_dict())
    assert all(blk.attn.fused_attn for blk in fused.model.blocks)
    assert not any(blk.attn.fused_attn for blk in plain.model.blocks)
    x = _img(32, 32)
    assert torch.allclose(fused(x), plain(x), atol=1e-5)


def _source(shallow, arch="dino", model_type="vit_small", patch=16, seed=3):
    torch.manual_seed(seed)
    src = Backbone(arch, model_type, patch, pretrained=False, fit="resize")
    return src, {k: v.clone() for k, v in src.model.state_dict().items()}


def test_load_official_dino_layout(shallow, tmp_path):
    src, sd = _source(shallow)
    torch.save(sd, tmp_path / "w.pth")
    torch.manual_seed(99)
    loaded = Backbone("dino", "vit_small", 16, pretrained=True, weights_path=tmp_path / "w.pth")
    x = _img(32, 48)
    assert torch.equal(loaded(x), src(x))
    assert not torch.equal(Backbone("dino", "vit_small", 16, pretrained=False)(x), src(x))

    nested = {"teacher": {"module.backbone." + k: v for k, v in sd.items()},
              "student": {"backbone.cls_token": torch.zeros(1)}, "epoch": 3}
    nested["teacher"]["module.head.last_layer.weight"] = torch.zeros(2, 2)
    torch.save(nested, tmp_path / "full.pth")
    full = Backbone("dino", "vit_small", 16, pretrained=True, weights_path=tmp_path / "full.pth")
    assert torch.equal(full(x), src(x))


def test_load_official_dinov2_layout(shallow, tmp_path):
    """Official DINOv2 files carry mask_token; ViT-G names its SwiGLU layers w12 / w3."""
    src, sd = _source(shallow, "dinov2", "vit_giant", 14)
    official = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in sd.items()}
    official["mask_token"] = torch.zeros(1, 1536)
    assert "blocks.0.mlp.w12.weight" in official and "blocks.0.ls1.gamma" in official
    torch.save(official, tmp_path / "g.pth")
    loaded = Backbone("dinov2", "vit_giant", 14, pretrained=True, weights_path=tmp_path / "g.pth",
                      fit="resize")
    x = _img(28, 42)
    assert torch.equal(loaded(x), src(x))


def test_load_rejects_bad_files(shallow, tmp_path):
    _, sd = _source(shallow)
    fresh = Backbone("dino", "vit_small", 16, pretrained=False)
    missing = dict(sd)
    del missing["norm.weight"]
    with pytest.raises(SmoosegError, match=r"src\.pth.*missing keys norm\.weight"):
        load_official_state_dict(fresh, missing, "src.pth")
    extra = dict(sd, **{"head.weight": torch.zeros(3, 384)})
    with pytest.raises(SmoosegError, match=r"unexpected keys head\.weight"):
        load_official_state_dict(fresh.model, extra, "src.pth")
    wrong = dict(sd, pos_embed=torch.zeros(1, 50, 384))
    with pytest.raises(SmoosegError, match=r"pos_embed \(1, 50, 384\)"):
        load_official_state_dict(fresh, wrong, "src.pth")

    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(SmoosegError, match=r"missing\.pth.*norm\.weight"):
        Backbone("dino", "vit_small", 16, weights_path=tmp_path / "missing.pth")
    with pytest.raises(SmoosegError, match=r"weights_path=.*nope\.pth"):
        Backbone("dino", "vit_small", 16, weights_path=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SmoosegError, match=r"junk\.pth"):
        Backbone("dino", "vit_small", 16, weights_path=tmp_path / "junk.pth")
    assert "\n" not in str(pytest.raises(SmoosegError, load_official_state_dict, fresh, missing, "s").value)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Handler.requests.append(self.path)
        super().do_GET()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_into_hub_cache(shallow, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    filename, _ = official_weights("dino", "vit_small", 16)
    cache = tmp_path / "torch" / "hub" / "checkpoints" / filename
    assert bb.weights_cache_path(filename) == cache

    src, sd = _source(shallow)
    serve = tmp_path / "serve"
    serve.mkdir()
    torch.save(sd, serve / "mirror.pth")
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(serve)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mirror.pth"
    try:
        first = Backbone("dino", "vit_small", 16, pretrained=True, weights_url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert _Handler.requests == ["/mirror.pth"]
    assert cache.is_file() and sorted(p.name for p in cache.parent.iterdir()) == [filename]
    x = _img(32, 32)
    assert torch.equal(first(x), src(x))
    second = Backbone("dino", "vit_small", 16, pretrained=True, weights_url=url)
    assert torch.equal(second(x), src(x)) and _Handler.requests == ["/mirror.pth"]


def test_unreachable_download_names_cache_path(shallow, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    filename, _ = official_weights("dinov2", "vit_small", 14)
    cache = tmp_path / "torch" / "hub" / "checkpoints" / filename
    url = f"http://127.0.0.1:{_free_port()}/{filename}"
    with pytest.raises(SmoosegError) as err:
        Backbone("dinov2", "vit_small", 14, pretrained=True, weights_url=url)
    msg = str(err.value)
    assert str(cache) in msg and "weights_path" in msg and "pretrained=false" in msg and "\n" not in msg
    assert not cache.exists() and not any(cache.parent.iterdir())
