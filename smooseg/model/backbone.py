"""Frozen DINO / DINOv2 ViT backbone: a timm model whose only change is the resampling of its
position embeddings (docs/method.md section 1).

The feature map is the last block's output after the final LayerNorm, patch tokens only,
as B x C x h x w.  ``feat_type="KK"`` returns the keys of the last block's attention instead
(heads concatenated along channels).  The backbone never trains: every parameter has
``requires_grad=False``, the timm model stays in eval mode and ``forward`` runs under
``torch.no_grad``.  Weights come from :mod:`smooseg.model.weights`.
"""

import math
import types

import timm
import torch
import torch.nn.functional as F
from torch import nn

from smooseg.errors import SmoosegError
from smooseg.model.weights import load_official_state_dict, read_weights, resolve_weights, timm_name
from smooseg.runtime import autocast

FEAT_TYPES = ("feat", "KK")
# How position embeddings are resampled to other grids; part of the feature cache's key, so
# features computed with another resampling are never reused.
POS_EMBED_RESAMPLING = "official-bicubic-scale-factor-offset0.1"
FITS = ("error", "resize", "pad")

# What a DINOv2 checkpoint of the reference implies for inputs that are not a multiple of 14
# (320 px -> 322); DINO inputs must be multiples of 8 / 16.
DEFAULT_FIT = {"dino": "error", "dinov2": "resize"}


def patch_multiple(n, patch):
    """The multiple of ``patch`` nearest to ``n`` (halves round up), at least one patch."""
    return max(1, (2 * int(n) + patch) // (2 * patch)) * patch


def official_pos_embed_grid(pos_embed, grid, num_prefix_tokens=1):
    """Position embeddings 1 x (prefix + h*w) x C for a patch grid ``(h, w)``, resampled as the
    official DINO / DINOv2 code does.

    The stored M x M patch grid is resized bicubically with a SCALE FACTOR ((h + 0.1) / M,
    (w + 0.1) / M), no antialiasing, align_corners False (the output is then h x w), in float32;
    prefix (class token) embeddings are kept as they are.  A grid that already is M x M is
    returned unchanged.  timm's own resize asks for a size and antialiases, which gives
    different features (docs/method.md section 1).
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, channels = patches.shape[1:]
    side = math.isqrt(n)
    if side * side != n:
        raise SmoosegError(f"position embedding holds {n} patch positions, not a square grid; "
                           "use an official DINO / DINOv2 checkpoint")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (side, side):
        return pos_embed
    square = patches.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                            align_corners=False, antialias=False)
    if resized.shape[-2:] != (h, w):  # cannot happen for h, w >= 1; guards the formula
        raise SmoosegError(f"position-embedding resampling gave {tuple(resized.shape[-2:])} for a "
                           f"{h}x{w} patch grid")
    resized = resized.permute(0, 2, 3, 1).reshape(1, h * w, channels).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def _official_pos_embed(vit, x):
    """Replacement of timm's ``VisionTransformer._pos_embed`` (B x h x w x C patch tokens in,
    B x (prefix + h*w) x C out) whose only change is the resampling of the position grid."""
    B, h, w, C = x.shape
    x = x.reshape(B, h * w, C)
    prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:
        x = x + official_pos_embed_grid(vit.pos_embed, (h, w), num_prefix_tokens=0)
        x = torch.cat(prefix + [x], dim=1) if prefix else x
    else:
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        x = x + official_pos_embed_grid(vit.pos_embed, (h, w), vit.num_prefix_tokens)
    return vit.pos_drop(x)


def use_official_pos_embed(vit):
    """Make a timm ViT built with ``dynamic_img_size=True`` resample its position embeddings
    like the official DINO / DINOv2 code (:func:`official_pos_embed_grid`)."""
    if not getattr(vit, "dynamic_img_size", False) or vit.pos_embed is None:
        raise ValueError("use_official_pos_embed needs a timm ViT built with dynamic_img_size=True")
    vit._pos_embed = types.MethodType(_official_pos_embed, vit)
    return vit


class Backbone(nn.Module):
    """Frozen ViT feature extractor: image B x 3 x H x W (ImageNet-normalised) -> B x C x h x w.

    ``fit`` handles H/W that are not multiples of the patch size:
      - ``"error"``: raise a SmoosegError;
      - ``"resize"``: bilinearly resize to the nearest multiple (at least one patch),
        so h = round(H / patch);
      - ``"pad"``: zero-pad right/bottom to the next multiple and keep the padded patches,
        so h = ceil(H / patch) (zeros are the ImageNet mean colour after normalisation).
    DINOv2 (patch 14) at 320 px is not a multiple; presets use ``fit: resize`` (320 -> 322,
    a 23 x 23 grid).  Position embeddings are resampled for any grid exactly as the official
    DINO / DINOv2 code does (:func:`official_pos_embed_grid`).

    ``weights_url`` overrides the official download URL of the weights file (a mirror).
    """

    def __init__(self, arch="dino", model_type="vit_small", patch_size=8, feat_type="feat",
                 pretrained=True, weights_path=None, fit="error", fused_attn=True, weights_url=None):
        super().__init__()
        name = timm_name(arch, model_type, patch_size)
        if feat_type not in FEAT_TYPES:
            raise SmoosegError(f"unknown feat_type={feat_type}: choose one of {', '.join(FEAT_TYPES)}")
        if fit not in FITS:
            raise SmoosegError(f"unknown fit={fit}: choose one of {', '.join(FITS)}")
        self.arch, self.model_type, self.patch_size = arch, model_type, int(patch_size)
        self.feat_type, self.fit = feat_type, fit
        self.model = use_official_pos_embed(
            timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True))
        if pretrained:
            path = resolve_weights(arch, model_type, patch_size, weights_path, weights_url)
            load_official_state_dict(self.model, read_weights(path), str(path))
        self.model.requires_grad_(False)
        self.model.eval()
        self.set_fused_attn(fused_attn)
        self.n_feats = self.model.embed_dim

    def set_fused_attn(self, enabled: bool):
        """Switch timm's fused (scaled_dot_product_attention) kernel on every attention module."""
        self.fused_attn = bool(enabled)
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = bool(enabled)

    def train(self, mode=True):
        """Set the wrapper's mode; the ViT itself always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def fit_input(self, img):
        """Apply the ``fit`` policy so H and W become multiples of the patch size."""
        p = self.patch_size
        H, W = img.shape[-2:]
        if H % p == 0 and W % p == 0:
            return img
        if self.fit == "resize":
            size = (patch_multiple(H, p), patch_multiple(W, p))
            return F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        if self.fit == "pad":
            return F.pad(img, (0, -W % p, 0, -H % p))
        raise SmoosegError(
            f"image size {H}x{W} is not a multiple of the backbone patch size {p}: "
            f"set model.fit=resize or model.fit=pad, or use a resolution that is a multiple of {p}")

    def _tokens(self, img):
        if self.feat_type == "feat":
            return self.model.forward_features(img)
        captured = []
        qkv = self.model.blocks[-1].attn.qkv
        handle = qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model.forward_features(img)
        finally:
            handle.remove()
        C = self.n_feats
        return captured[-1][..., C:2 * C]

    def forward(self, img):
        """Features B x C x h x w (float32, contiguous, no autograd history)."""
        img = self.fit_input(img)
        B, _, H, W = img.shape
        h, w = H // self.patch_size, W // self.patch_size
        with torch.no_grad():
            tokens = self._tokens(img)[:, self.model.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(B, -1, h, w).float().contiguous()


def frozen_features(backbone, img, precision="auto"):
    """Backbone features B×C×h×w (float32) of normalised images, ready to feed trainable heads.

    The backbone (a :class:`Backbone`, or a compiled one) runs under ``torch.inference_mode`` and
    autocast at ``precision`` (:func:`smooseg.runtime.autocast`: ``auto`` is bf16 / fp16 on a GPU,
    fp32 elsewhere; fp32 switches a surrounding autocast off).  Outside inference mode the result
    is cloned into an ordinary tensor, so autograd may save it for the heads' backward pass.
    """
    with torch.inference_mode(), autocast(img.device, precision):
        feats = backbone(img)
    feats = feats.float()
    return feats if torch.is_inference_mode_enabled() else feats.clone()
