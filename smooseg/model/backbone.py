"""Frozen ViT backbone (DINO, DINOv2, DINOv2 with registers, DINOv3): the timm model of its
:class:`~smooseg.model.backbones.BackboneSpec`, computing what the official code computes
(docs/method.md section 1).

The feature map is the last block's output after the final LayerNorm, patch tokens only (after
the class and register tokens), as B x C x h x w.  ``feat_type="KK"`` returns the keys of the last
block's attention instead (heads concatenated along channels, before any rotary embedding).
Position embeddings follow the patch grid by the spec's policy: DINO / DINOv2 resample theirs
as the official code does (scale factor, offset 0.1, not timm's default); DINOv2 with registers
uses timm's default (size-based, antialiased), which is the official one; DINOv3 recomputes its
rotary embedding for each grid with the release file's periods.  The backbone never trains:
every parameter has
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
from smooseg.model.backbones import (
    FITS,
    POS_ROPE,
    POS_SCALE_OFFSET,
    backbone_spec,
    convert_timm,
    renormalisation,
)
from smooseg.model.weights import WEIGHTS_SOURCES, load_official_state_dict, read_weights, resolve_weights
from smooseg.runtime import autocast

FEAT_TYPES = ("feat", "KK")


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


def build_timm_model(spec):
    """The spec's timm model (random init, no head, any input size) computing as its official
    code does: DINO / DINOv2 resample their position embeddings the official way; DINOv3 keeps
    its RoPE periods in the state dict, so the release file's (bf16-rounded) values are loaded
    and saved with the weights."""
    model = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, dynamic_img_size=True)
    if spec.pos_embed == POS_SCALE_OFFSET:
        use_official_pos_embed(model)
    if spec.pos_embed == POS_ROPE:
        model.rope.register_buffer("periods", model.rope.periods, persistent=True)
    return model


class Backbone(nn.Module):
    """Frozen ViT feature extractor: image B x 3 x H x W (ImageNet-normalised) -> B x C x h x w.

    ``fit`` handles H/W that are not multiples of the patch size (None: the spec's default):
      - ``"error"``: raise a SmoosegError;
      - ``"resize"``: bilinearly resize to the nearest multiple (at least one patch),
        so h = round(H / patch);
      - ``"pad"``: zero-pad right/bottom to the next multiple and keep the padded patches,
        so h = ceil(H / patch).
    DINOv2 (patch 14) at 320 px is not a multiple; its presets use ``fit: resize`` (320 -> 322,
    a 23 x 23 grid).

    Weights that expect another input normalisation than ImageNet's (DINOv3 SAT-493M) get the
    ImageNet-normalised input re-normalised by one per-channel affine map first, so the data
    pipeline stays the same for every backbone.  ``weights_data`` picks the release (None: the
    spec's default), ``weights_source`` official | timm the file's origin, ``weights_url``
    overrides the download URL (a mirror, or the personal URL of a gated release).
    """

    def __init__(self, arch="dino", model_type="vit_small", patch_size=8, feat_type="feat",
                 pretrained=True, weights_path=None, fit=None, fused_attn=True, weights_url=None,
                 weights_data=None, weights_source="official"):
        super().__init__()
        self.spec = backbone_spec(arch, model_type, patch_size)
        release = self.spec.release(weights_data)
        fit = self.spec.fit if fit is None else fit
        if feat_type not in FEAT_TYPES:
            raise SmoosegError(f"unknown feat_type={feat_type}: choose one of {', '.join(FEAT_TYPES)}")
        if fit not in FITS:
            raise SmoosegError(f"unknown fit={fit}: choose one of {', '.join(FITS)}")
        if weights_source not in WEIGHTS_SOURCES:
            raise SmoosegError(f"unknown model.weights_source={weights_source}: choose one of "
                               f"{', '.join(WEIGHTS_SOURCES)}")
        self.arch, self.model_type, self.patch_size = arch, model_type, int(patch_size)
        self.feat_type, self.fit = feat_type, fit
        self.weights_data = release.data
        self.pos_embed_policy = self.spec.pos_embed
        self.model = build_timm_model(self.spec)
        if pretrained:
            path = resolve_weights(arch, model_type, patch_size, weights_path, weights_url, release.data,
                                   weights_source)
            convert = self.spec.convert if weights_source == "official" else convert_timm
            load_official_state_dict(self.model, read_weights(path), str(path), convert=convert)
        self._set_renormalisation(release)
        self.model.requires_grad_(False)
        self.model.eval()
        self.set_fused_attn(fused_attn)
        self.n_feats = self.model.embed_dim

    def _set_renormalisation(self, release):
        renorm = renormalisation(release)
        self._renorm = renorm is not None
        if renorm is not None:  # not persistent: it follows from weights_data, kept by checkpoints
            self.register_buffer("renorm_scale", renorm[0], persistent=False)
            self.register_buffer("renorm_shift", renorm[1], persistent=False)

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

    def renormalise(self, img):
        """ImageNet-normalised images -> normalised as the weights expect (identity for most)."""
        return img * self.renorm_scale + self.renorm_shift if self._renorm else img

    def _tokens(self, img):
        if self.feat_type == "feat":
            return self.model.forward_features(img)
        captured = []
        attn = self.model.blocks[-1].attn

        def keep_input(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["x"])

        handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
        try:
            self.model.forward_features(img)
        finally:
            handle.remove()
        return self.spec.keys(attn, captured[-1])

    def forward(self, img):
        """Features B x C x h x w (float32, contiguous, no autograd history)."""
        img = self.fit_input(self.renormalise(img))
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
