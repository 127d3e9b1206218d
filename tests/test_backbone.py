"""Tests for the frozen ViT backbone (docs/method.md §1): shapes, features, freezing, weights."""

import functools
import http.server
import socket
import threading

import pytest
import timm
import torch
from torch import nn

from smooseg.errors import SmoosegError
from smooseg.model import backbone as bb
from smooseg.model import weights
from smooseg.model.backbone import Backbone
from smooseg.model.backbones import backbone_spec, list_backbones
from smooseg.model.weights import load_official_state_dict, official_weights, timm_name

WIDTH = {"vit_small": 384, "vit_small_plus": 384, "vit_base": 768, "vit_large": 1024, "vit_huge_plus": 1280,
         "vit_giant": 1536}


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


@pytest.mark.parametrize("key", list_backbones())
def test_shapes_every_arch(shallow, key):
    """Every registered backbone at 224 and 320 px (DINOv2 at 320 via resize and pad: 23 x 23)."""
    arch, model_type, patch = _split(key)
    C = WIDTH[model_type]
    b = Backbone(arch, model_type, patch, pretrained=False, fit="error")
    assert shallow == [backbone_spec(arch, model_type, patch).timm_model]
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
    assert weights.weights_cache_path(filename) == cache

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


# ---- position embeddings resampled as the official DINO / DINOv2 code (docs/method.md section 1) ----

def _cubic_weights(out_len, in_len, scale):
    """out_len x in_len matrix of PyTorch-style bicubic interpolation (A = -0.75, align_corners
    False, indices clamped at the borders) for a given scale factor, written out by hand."""
    A = -0.75

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (A + 2) * t ** 3 - (A + 3) * t ** 2 + 1
        if t < 2:
            return A * t ** 3 - 5 * A * t ** 2 + 8 * A * t - 4 * A
        return 0.0

    weights = torch.zeros(out_len, in_len, dtype=torch.float64)
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        base = int(torch.floor(torch.tensor(src)))
        for k in range(base - 1, base + 3):
            weights[i, min(max(k, 0), in_len - 1)] += kernel(src - k)
    return weights


def _reference_pos_embed(pos_embed, h, w):
    """The official formula by hand: scale factors ((h+0.1)/M, (w+0.1)/M), no antialiasing."""
    cls, grid = pos_embed[0, :1].double(), pos_embed[0, 1:].double()
    M = int(round(grid.shape[0] ** 0.5))
    if (h, w) == (M, M):
        return pos_embed
    grid = grid.reshape(M, M, -1).permute(2, 0, 1)
    rows, cols = _cubic_weights(h, M, (h + 0.1) / M), _cubic_weights(w, M, (w + 0.1) / M)
    resized = torch.einsum("hm,cmn,wn->hwc", rows, grid, cols).reshape(h * w, -1)
    return torch.cat([cls, resized])[None].float()


def _smooth_pos_embed(vit):
    """A smooth, structured position field (sinusoids of the grid coordinates), amplitude 1."""
    n, C = vit.pos_embed.shape[1] - 1, vit.pos_embed.shape[2]
    M = int(round(n ** 0.5))
    y, x = torch.meshgrid(torch.linspace(0, 1, M), torch.linspace(0, 1, M), indexing="ij")
    freq = torch.arange(C) % 4 + 1
    phase = torch.arange(C) * 0.37
    field = torch.sin(torch.pi * freq * (x.reshape(-1, 1) + 0.5 * y.reshape(-1, 1)) + phase)
    field = field * torch.cos(torch.pi * freq * y.reshape(-1, 1) - phase)
    return torch.cat([torch.linspace(-1, 1, C)[None], field])[None]


def _features_by_hand(vit, img, pos_embed, patch):
    """Last block output after the final norm, patch tokens, with the given position embeddings."""
    B, _, H, W = img.shape
    h, w = H // patch, W // patch
    tokens = vit.patch_embed(img).reshape(B, h * w, -1)
    x = torch.cat([vit.cls_token.expand(B, -1, -1), tokens], dim=1) + pos_embed
    x = vit.norm_pre(x)
    for block in vit.blocks:
        x = block(x)
    x = vit.norm(x)[:, 1:]
    return x.transpose(1, 2).reshape(B, -1, h, w)


def _rel_l2(a, b):
    return float((a - b).norm() / b.norm())


OFFICIAL_RESAMPLING_CASES = [("dino", 8, 224), ("dino", 8, 320), ("dino", 8, 160), ("dino", 8, 112),
                             ("dinov2", 14, 224), ("dinov2", 14, 322), ("dinov2", 14, 168)]


@pytest.fixture(scope="module")
def structured_backbones():
    """Two-block ViT-S backbones (DINO /8 and DINOv2 /14) with a smooth position embedding."""
    out = {}
    for arch, patch in (("dino", 8), ("dinov2", 14)):
        torch.manual_seed(0)
        original = timm.create_model
        try:
            timm.create_model = functools.partial(original, depth=2)
            backbone = Backbone(arch, "vit_small", patch, pretrained=False)
        finally:
            timm.create_model = original
        with torch.no_grad():
            backbone.model.pos_embed.copy_(_smooth_pos_embed(backbone.model))
        out[arch] = backbone
    return out


@pytest.mark.parametrize("arch,patch,size", OFFICIAL_RESAMPLING_CASES)
def test_features_match_official_pos_embed_resampling(structured_backbones, arch, patch, size):
    backbone = structured_backbones[arch]
    vit = backbone.model
    img = _img(size, size, seed=size)
    expected = _features_by_hand(vit, img, _reference_pos_embed(vit.pos_embed, size // patch, size // patch),
                                 patch)
    assert _rel_l2(backbone(img), expected) <= 1e-5


def test_official_resampling_non_square_grid(structured_backbones):
    backbone = structured_backbones["dino"]
    img = _img(112, 176)
    pos_embed = _reference_pos_embed(backbone.model.pos_embed, 14, 22)
    expected = _features_by_hand(backbone.model, img, pos_embed, 8)
    assert _rel_l2(backbone(img), expected) <= 1e-5


@pytest.mark.parametrize("arch,patch,size", [("dino", 8, 320), ("dino", 8, 112), ("dinov2", 14, 224)])
def test_timm_default_resize_would_differ(structured_backbones, arch, patch, size):
    """timm's own (size-based, antialiased) resampling gives other features: the check above is
    sensitive to the difference it guards against."""
    from timm.layers import resample_abs_pos_embed

    vit = structured_backbones[arch].model
    h = size // patch
    timm_pe = resample_abs_pos_embed(vit.pos_embed, new_size=(h, h), num_prefix_tokens=1)
    official = _reference_pos_embed(vit.pos_embed, h, h)
    img = _img(size, size, seed=size)
    assert _rel_l2(_features_by_hand(vit, img, timm_pe, patch),
                   _features_by_hand(vit, img, official, patch)) > 1e-3
    assert _rel_l2(structured_backbones[arch](img), _features_by_hand(vit, img, timm_pe, patch)) > 1e-3


def test_official_grid_unchanged_at_native_size(structured_backbones):
    vit = structured_backbones["dino"].model
    assert bb.official_pos_embed_grid(vit.pos_embed, (28, 28)) is vit.pos_embed
