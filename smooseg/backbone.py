"""Frozen DINO / DINOv2 ViT backbone built with timm (SPEC section 1).

The feature map is the last block's output after the final LayerNorm, patch tokens only,
as B x C x h x w.  ``feat_type="KK"`` returns the keys of the last block's attention instead
(heads concatenated along channels).  The backbone never trains: every parameter has
``requires_grad=False``, the timm model stays in eval mode and ``forward`` runs under
``torch.no_grad``.

Weights are the official DINO / DINOv2 release files, looked up in this order: an explicit
``weights_path``, the torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``), then a
download of the official URL into that cache.  There is no silent fallback to random weights.
"""

import http.client
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from smooseg.errors import SmoosegError

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com"

ARCHS = {
    "dino/vit_small/8": "vit_small_patch8_224.dino",
    "dino/vit_small/16": "vit_small_patch16_224.dino",
    "dino/vit_base/8": "vit_base_patch8_224.dino",
    "dino/vit_base/16": "vit_base_patch16_224.dino",
    "dinov2/vit_small/14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2/vit_base/14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2/vit_large/14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2/vit_giant/14": "vit_giant_patch14_dinov2.lvd142m",
}

_OFFICIAL_FILES = {
    "dino/vit_small/8": "dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
    "dino/vit_small/16": "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino/vit_base/8": "dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino/vit_base/16": "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dinov2/vit_small/14": "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2/vit_base/14": "dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2/vit_large/14": "dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    "dinov2/vit_giant/14": "dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth",
}

FEAT_TYPES = ("feat", "KK")
# How position embeddings are resampled to other grids; part of the feature cache's key, so
# features computed with another resampling are never reused.
POS_EMBED_RESAMPLING = "official-bicubic-scale-factor-offset0.1"
FITS = ("error", "resize", "pad")
_NEST_KEYS = ("teacher", "student", "model", "state_dict")
_STRIP_PREFIXES = ("module.", "backbone.")


def _arch_key(arch, model_type, patch_size):
    try:
        patch = int(patch_size)
    except (TypeError, ValueError):
        patch = patch_size
    key = f"{arch}/{model_type}/{patch}"
    if key not in ARCHS:
        raise SmoosegError(
            f"unknown backbone arch={arch} model_type={model_type} patch_size={patch_size}: "
            f"choose one of {', '.join(ARCHS)} (arch/model_type/patch_size)")
    return key


def timm_name(arch: str, model_type: str, patch_size: int) -> str:
    """timm model name for a (arch, model_type, patch_size) triple; SmoosegError if unsupported."""
    return ARCHS[_arch_key(arch, model_type, patch_size)]


def official_weights(arch, model_type, patch_size):
    """(filename, url) of the official release file for this backbone."""
    rel = _OFFICIAL_FILES[_arch_key(arch, model_type, patch_size)]
    return rel.rsplit("/", 1)[-1], f"{OFFICIAL_BASE_URL}/{rel}"


def weights_cache_path(filename) -> Path:
    """Where the torch hub cache keeps ``filename`` (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(arch, model_type, patch_size, weights_path=None, weights_url=None) -> Path:
    """Local path of the weights: ``weights_path``, else the hub cache, else downloaded there.

    ``weights_url`` replaces the official URL of the file (a mirror); the cached file keeps
    the official file name.
    """
    filename, url = official_weights(arch, model_type, patch_size)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise SmoosegError(
                f"model.weights_path={path} does not exist: point it at the official file "
                f"{filename}, or leave it unset to use the torch hub cache")
        return path
    cache = weights_cache_path(filename)
    if cache.is_file():
        return cache
    url = weights_url or url
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cache), progress=True)
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = " ".join(str(err).split())
        raise SmoosegError(
            f"could not get DINO weights {filename} from {url} ({type(err).__name__}: {reason}): "
            f"put the official file at {cache} or set model.weights_path=..., "
            f"or model.pretrained=false for random init (testing only)") from err
    return cache


def read_weights(path):
    """Load a weights file with weights-only unpickling onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many types; all mean "unusable file"
        reason = " ".join(str(err).split())[:200]
        raise SmoosegError(
            f"could not read weights file {path} ({type(err).__name__}: {reason}): "
            f"replace it with the official release file (a plain state dict)") from err


def _unwrap(state_dict):
    """Find the parameter dict inside a checkpoint and strip wrapper prefixes.

    Accepts a raw state dict or one nested under teacher/student/model/state_dict
    (the teacher is preferred, as in DINO evaluation).  ``module.`` and ``backbone.``
    prefixes are removed; when ``backbone.`` keys exist, other keys (a DINO projection
    head) are dropped.
    """
    while isinstance(state_dict, Mapping):
        nested = [k for k in _NEST_KEYS if isinstance(state_dict.get(k), Mapping)]
        if not nested:
            break
        state_dict = state_dict[nested[0]]
    if not isinstance(state_dict, Mapping):
        return state_dict
    for prefix in _STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _to_timm_layout(state_dict):
    """Official DINOv2 names -> timm: drop ``mask_token``, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``."""
    out = {}
    for k, v in state_dict.items():
        if k == "mask_token":
            continue
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    return out


def _first(keys, n=5):
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def load_official_state_dict(model, state_dict, source: str):
    """Strictly load an official DINO/DINOv2 state dict into a timm ViT (or a Backbone).

    ``state_dict`` may be nested or prefixed as described in ``_unwrap``.  Any missing,
    unexpected or wrongly shaped key raises a one-line SmoosegError naming ``source``.
    """
    if isinstance(model, Backbone):
        model = model.model
    state_dict = _unwrap(state_dict)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()):
        raise SmoosegError(f"weights {source} hold no state dict of tensors: use the official release file")
    state_dict = _to_timm_layout(state_dict)
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise SmoosegError(
            f"weights {source} do not fit the backbone: {'; '.join(parts)}: "
            f"use the official file for this arch/model_type/patch_size")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        raise SmoosegError(
            f"weights {source} have wrong shapes (file vs model): {_first(wrong, 3)}: "
            f"use the official file for this arch/model_type/patch_size")
    model.load_state_dict(state_dict, strict=True)
    return model


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
            size = (max(1, (2 * H + p) // (2 * p)) * p, max(1, (2 * W + p) // (2 * p)) * p)
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
