"""Test helpers: state dicts in the official DINOv3 / DINOv2-with-registers key layouts, built
from a timm model's shapes, and short independent implementations of the official forward
passes (read off facebookresearch/dinov3 and facebookresearch/dinov2, not from timm)."""

import contextlib
import functools
import math

import timm
import torch
import torch.nn.functional as F

from smooseg.model.backbone import Backbone


@contextlib.contextmanager
def shallow_timm(depth=2):
    """timm.create_model builds ``depth`` blocks (real width, heads and patch) inside the block."""
    original = timm.create_model
    timm.create_model = functools.partial(original, depth=depth)
    try:
        yield
    finally:
        timm.create_model = original


def shallow_backbone(*args, depth=2, **kwargs):
    with shallow_timm(depth):
        return Backbone(*args, **kwargs)


def image(h, w, seed=0):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def _randomised(sd, seed):
    """Every tensor of ``sd`` replaced by small random values (layer norms around 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sd.items():
        noise = torch.randn(value.shape, generator=g) * 0.05
        out[key] = 1 + noise if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else noise
    return out


# ---- DINOv3 ----

def dinov3_periods(head_dim, base=100.0):
    """The official RoPE periods base ** (2 i / (D/2)), i < D/4, stored rounded to bf16."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return (base ** exponents).to(torch.bfloat16)


def dinov3_official_state_dict(backbone, seed=0, swiglu=False, sat=False):
    """Official-layout DINOv3 weights with the shapes of ``backbone``'s timm model: random
    values, non-zero q / v biases, a non-zero k bias (masked by ``bias_mask``), bf16 periods,
    ``mask_token`` (and ``local_cls_norm`` for the SAT-493M ViT-L)."""
    vit = backbone.model
    timm_sd = _randomised(vit.state_dict(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    dim = vit.embed_dim
    official = {}
    for key, value in timm_sd.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        key = key.replace("gamma_2", "ls2.gamma")
        if swiglu:
            for timm_key, official_key in (("fc1_g", "w1"), ("fc1_x", "w2"), ("fc2", "w3")):
                key = key.replace(f"mlp.{timm_key}", f"mlp.{official_key}")
        official[key] = value
    for i in range(len(vit.blocks)):
        official[f"blocks.{i}.attn.qkv.bias"] = torch.randn(3 * dim, generator=g) * 0.5
        official[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    official["rope_embed.periods"] = dinov3_periods(dim // vit.blocks[0].attn.num_heads)
    official["mask_token"] = torch.zeros(1, dim)
    if sat:
        official["local_cls_norm.weight"] = torch.ones(dim)
        official["local_cls_norm.bias"] = torch.zeros(dim)
    return official


def _rope_sin_cos(periods, h, w):
    coords_h = torch.arange(0.5, h) / h
    coords_w = torch.arange(0.5, w) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def _rope_apply(x, sin, cos):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def dinov3_official_features(sd, img, num_heads, n_storage=4, patch=16, keys=False):
    """The official DINOv3 dense features (``get_intermediate_layers(n=1, reshape=True,
    norm=True)``) of a plain-MLP model from its official-layout state dict; with ``keys`` the
    last block's attention keys before RoPE (k bias masked) instead."""
    sd = {k: v.float() for k, v in sd.items()}
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    B, C, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1), x], dim=1)
    prefix, N = 1 + n_storage, x.shape[1]
    sin, cos = _rope_sin_cos(sd["rope_embed.periods"], h, w)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] * sd[p + "attn.qkv.bias_mask"])
        if keys and i == depth - 1:
            return qkv[:, prefix:, C:2 * C].transpose(1, 2).reshape(B, C, h, w)
        q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :prefix], _rope_apply(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], _rope_apply(k[:, :, prefix:], sin, cos)], dim=2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + sd[p + "ls1.gamma"] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * y
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)
    return x[:, prefix:].transpose(1, 2).reshape(B, C, h, w)


# ---- DINOv2 with registers ----

def dinov2_reg_official_state_dict(backbone, seed=0, grid=37):
    """Official-layout DINOv2-with-registers weights: ``register_tokens``, a 1 + grid² position
    embedding holding the class position, ``mask_token``; a smooth position field so that its
    resampling matters."""
    vit = backbone.model
    official = _randomised(vit.state_dict(), seed)
    dim = vit.embed_dim
    official["register_tokens"] = official.pop("reg_token")
    y, x = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
    freq = torch.arange(dim) % 5 + 1
    field = torch.sin(math.pi * freq * (x.reshape(-1, 1) + 0.7 * y.reshape(-1, 1)) + torch.arange(dim) * 0.3)
    official["pos_embed"] = torch.cat([torch.randn(1, dim) * 0.1, field])[None]
    official["mask_token"] = torch.zeros(1, dim)
    return official


def dinov2_reg_official_features(vit, sd, img, patch=14):
    """The official DINOv2-with-registers dense features: class + patch tokens plus the position
    embedding resampled to the grid by SIZE with antialiasing (interpolate_offset 0), registers
    inserted after the class token, the blocks (timm's, weights loaded from ``sd``), final norm."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    B, C, h, w = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"].float()
    M = int(math.isqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
    if (h, w) != (M, M):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    x = x + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, C)], dim=1)
    n_reg = sd["register_tokens"].shape[1]
    x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    for block in vit.blocks:
        x = block(x)
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1 + n_reg:].transpose(1, 2).reshape(B, C, h, w)
