"""The backbone registry: one :class:`BackboneSpec` per (arch, model_type, patch_size).

A spec holds every fact about a backbone that the rest of the package reads: the timm model
that computes it, its official release files (one :class:`Release` per training data set, with
the input normalisation those weights expect), the converter from the official key layout to
timm's, how position embeddings follow the patch grid, the default ``fit`` and how the ``KK``
keys are read.  ``weights.py`` (files), ``backbone.py`` (the model), the feature-cache key and
the model presets (``smooseg/configs/model/``) all read it.

Adding a backbone is one :func:`register` call (and one YAML preset); see docs/extending.md.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.eva import checkpoint_filter_fn as eva_filter
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

from smooseg.errors import SmoosegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Position-embedding policies (a spec's ``pos_embed``; part of the feature-cache key).
# DINO / DINOv2: bicubic by scale factor ((h + 0.1) / M), no antialiasing.
POS_SCALE_OFFSET = "official-bicubic-scale-factor-offset0.1"
# DINOv2 with registers: bicubic to the target size, antialiased (timm's own dynamic resize).
POS_SIZE_ANTIALIAS = "bicubic-size-antialias"
# DINOv3: rotary embeddings recomputed for every grid, with the release file's periods (kept in
# the state dict, so checkpoints hold them too).
POS_ROPE = "rope-file-periods"
POS_EMBED_POLICIES = (POS_SCALE_OFFSET, POS_SIZE_ANTIALIAS, POS_ROPE)

FITS = ("error", "resize", "pad")

FAIR_URL = "https://dl.fbaipublicfiles.com"
DINOV3_ACCESS = ("DINOv3 weights are gated: request access at "
                 "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ "
                 "(Meta e-mails the download URLs)")


@dataclass(frozen=True)
class Release:
    """One official weights file of a backbone.

    ``data``: the training data's name (the ``model.weights_data`` value); ``file``: the path
    under the release host; ``timm_tag``: timm's pretrained tag of the same weights (for
    ``weights_source=timm``); ``mean`` / ``std``: the input normalisation the weights expect.
    """

    data: str
    file: str
    timm_tag: str
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def filename(self):
        return self.file.rsplit("/", 1)[-1]


def qkv_keys(attn, x):
    """Attention keys of ``x`` (B x N x C, the attention's input) before any rotary embedding:
    the middle third of the qkv projection with its bias (a fixed zero ``k_bias`` where the
    official model masks the k bias), heads concatenated along channels."""
    n = attn.qkv.weight.shape[0] // 3
    bias = attn.qkv.bias
    bias = bias[n:2 * n] if bias is not None else getattr(attn, "k_bias", None)
    return F.linear(x, attn.qkv.weight[n:2 * n], bias)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the package knows about one backbone (see the module docstring).

    ``convert(state_dict, model)`` maps an official state dict to timm's names.
    ``releases``: the official files, the first being the default ``weights_data``.
    ``gated``: the files are not downloadable without a personal URL (``access`` says how).
    """

    arch: str
    model_type: str
    patch_size: int
    timm_model: str
    releases: tuple
    convert: Callable
    pos_embed: str
    fit: str
    licence: str
    base_url: str = FAIR_URL
    gated: bool = False
    access: str = ""
    keys: Callable = field(default=qkv_keys, compare=False)

    def __post_init__(self):
        if self.pos_embed not in POS_EMBED_POLICIES:
            raise ValueError(f"pos_embed={self.pos_embed}: choose one of {', '.join(POS_EMBED_POLICIES)}")
        if self.fit not in FITS:
            raise ValueError(f"fit={self.fit}: choose one of {', '.join(FITS)}")
        if not self.releases:
            raise ValueError(f"backbone {self.key} needs at least one release")

    @property
    def key(self):
        return f"{self.arch}/{self.model_type}/{self.patch_size}"

    def release(self, weights_data=None) -> Release:
        """The release for ``weights_data`` (None: the default, the first one)."""
        if weights_data is None:
            return self.releases[0]
        for release in self.releases:
            if release.data == weights_data:
                return release
        raise SmoosegError(f"model.weights_data={weights_data} has no release for {self.key}: "
                           f"choose one of {', '.join(r.data for r in self.releases)} (or null)")

    def url(self, release: Release) -> str:
        return f"{self.base_url}/{release.file}"


_REGISTRY: dict = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (an existing key is an error: one spec per backbone)."""
    if spec.key in _REGISTRY:
        raise ValueError(f"backbone {spec.key} is already registered")
    _REGISTRY[spec.key] = spec
    return spec


def unregister(key: str):
    """Remove a registered spec (for tests that register their own)."""
    _REGISTRY.pop(key, None)


def list_backbones():
    """Every registered ``arch/model_type/patch_size`` key, in registration order."""
    return list(_REGISTRY)


def backbone_spec(arch, model_type, patch_size) -> BackboneSpec:
    """The spec of a backbone; a one-line SmoosegError naming the valid choices otherwise."""
    try:
        patch = int(patch_size)
    except (TypeError, ValueError):
        patch = patch_size
    spec = _REGISTRY.get(f"{arch}/{model_type}/{patch}")
    if spec is None:
        raise SmoosegError(
            f"unknown backbone arch={arch} model_type={model_type} patch_size={patch_size}: "
            f"choose one of {', '.join(_REGISTRY)} (arch/model_type/patch_size)")
    return spec


# ---- converters: official key layout -> timm's ----

def _filtered(timm_filter, state_dict, model):
    """``timm_filter`` without its silent resampling of a patch projection of another shape:
    the file's projection is passed through as it is, for the strict shape check to name."""
    state_dict = dict(state_dict)
    proj = state_dict.pop("patch_embed.proj.weight", None)
    out = timm_filter(state_dict, model)
    if proj is not None:
        out["patch_embed.proj.weight"] = proj
    return out


def convert_identity(state_dict, model):
    """DINO release files already use timm's names."""
    return dict(state_dict)


def convert_timm(state_dict, model):
    """timm's own copies (``weights_source=timm``) use timm's names; they hold no RoPE periods,
    which timm regenerates in fp32: those are the periods then."""
    out = dict(state_dict)
    rope = getattr(model, "rope", None)
    if rope is not None and hasattr(rope, "periods") and "rope.periods" not in out:
        out["rope.periods"] = rope.periods
    return out


def convert_dinov2(state_dict, model):
    """DINOv2 (with or without registers): ``mask_token`` dropped, SwiGLU ``w12``/``w3`` ->
    ``fc1``/``fc2``, and for registers ``register_tokens`` -> ``reg_token`` with the class
    position folded into ``cls_token`` (timm's filter)."""
    if "mask_token" not in state_dict:
        return dict(state_dict)
    state_dict = dict(state_dict)
    pos = state_dict.get("pos_embed")
    positions = model.pos_embed.shape[1] + (1 if "register_tokens" in state_dict else 0)
    if pos is None or pos.shape[1] == positions:
        return _filtered(vit_filter, state_dict, model)
    # another position grid: converted around a placeholder, never resampled; the file's own
    # tensor goes on to the strict shape check, which names it
    state_dict["pos_embed"] = pos.new_zeros(1, positions, pos.shape[2])
    out = _filtered(vit_filter, state_dict, model)
    out["pos_embed"] = pos
    return out


def _check_k_bias_mask(state_dict):
    """The official DINOv3 qkv has a fixed bias mask [1 (q), 0 (k), 1 (v)]: the k bias is
    ignored; any other pattern would compute something timm cannot."""
    for key, mask in state_dict.items():
        if not key.endswith("qkv.bias_mask"):
            continue
        q, k, v = mask.float().chunk(3)
        if not (bool((q == 1).all()) and bool((k == 0).all()) and bool((v == 1).all())):
            raise SmoosegError(f"weights key {key} is not the official [1, 0, 1] k-bias mask: "
                               "use an official DINOv3 release file")


def convert_dinov3(state_dict, model):
    """DINOv3: timm's Eva filter (``storage_tokens`` -> ``reg_token``, ``ls1/ls2.gamma`` ->
    ``gamma_1/2``, q / v biases split out of ``qkv.bias``, SwiGLU ``w1/w2/w3`` renamed; the k
    bias, ``bias_mask``, ``mask_token`` and ``local_cls_norm`` dropped) plus the file's RoPE
    ``periods`` kept as ``rope.periods`` (stored rounded to bf16; timm would regenerate them)."""
    if "storage_tokens" not in state_dict:
        return dict(state_dict)
    _check_k_bias_mask(state_dict)
    periods = state_dict.get("rope_embed.periods")
    out = _filtered(eva_filter, state_dict, model)
    if periods is not None:
        out["rope.periods"] = periods
    return out


# ---- the registry ----

_DINO_FILES = {
    ("vit_small", 8): "dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
    ("vit_small", 16): "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_base", 8): "dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    ("vit_base", 16): "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}
for (_type, _patch), _file in _DINO_FILES.items():
    register(BackboneSpec(
        arch="dino", model_type=_type, patch_size=_patch,
        timm_model=f"{_type}_patch{_patch}_224",
        releases=(Release("imagenet", _file, "dino"),),
        convert=convert_identity, pos_embed=POS_SCALE_OFFSET, fit="error", licence="Apache-2.0"))

_DINOV2_SHORT = {"vit_small": "s", "vit_base": "b", "vit_large": "l", "vit_giant": "g"}
for _type, _short in _DINOV2_SHORT.items():
    register(BackboneSpec(
        arch="dinov2", model_type=_type, patch_size=14, timm_model=f"{_type}_patch14_dinov2",
        releases=(Release("lvd142m", f"dinov2/dinov2_vit{_short}14/dinov2_vit{_short}14_pretrain.pth",
                          "lvd142m"),),
        # the reference's DINOv2 runs resize 320 px inputs to 322 (a 23 x 23 grid)
        convert=convert_dinov2, pos_embed=POS_SCALE_OFFSET, fit="resize", licence="Apache-2.0"))
for _type, _short in _DINOV2_SHORT.items():
    register(BackboneSpec(
        arch="dinov2_reg", model_type=_type, patch_size=14, timm_model=f"{_type}_patch14_reg4_dinov2",
        releases=(Release("lvd142m",
                          f"dinov2/dinov2_vit{_short}14/dinov2_vit{_short}14_reg4_pretrain.pth",
                          "lvd142m"),),
        convert=convert_dinov2, pos_embed=POS_SIZE_ANTIALIAS, fit="resize", licence="Apache-2.0"))

SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)
# model_type -> (official short name, LVD-1689M hash, SAT-493M hash or None), from the official
# dinov3 hub/backbones.py
_DINOV3 = {
    "vit_small": ("vits16", "08c60483", None),
    "vit_small_plus": ("vits16plus", "4057cbaa", None),
    "vit_base": ("vitb16", "73cec8be", None),
    "vit_large": ("vitl16", "8aa4cbdd", "eadcf0ff"),
    "vit_huge_plus": ("vith16plus", "7c1da9a5", None),
}


def _dinov3_release(short, data, digest, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return Release(data, f"dinov3/dinov3_{short}/dinov3_{short}_pretrain_{data}-{digest}.pth", data,
                   mean, std)


for _type, (_short, _lvd, _sat) in _DINOV3.items():
    _releases = [_dinov3_release(_short, "lvd1689m", _lvd)]
    if _sat:
        _releases.append(_dinov3_release(_short, "sat493m", _sat, SAT_MEAN, SAT_STD))
    register(BackboneSpec(
        arch="dinov3", model_type=_type, patch_size=16,
        # only the *_qkvb variants keep the q / v biases of the release files
        timm_model=f"{_type}_patch16_dinov3_qkvb",
        releases=tuple(_releases), convert=convert_dinov3, pos_embed=POS_ROPE, fit="error",
        licence="DINOv3 License", gated=True, access=DINOV3_ACCESS))


def renormalisation(release: Release, mean_in=IMAGENET_MEAN, std_in=IMAGENET_STD):
    """(scale, shift), each 1 x 3 x 1 x 1, such that ``x * scale + shift`` turns an image
    normalised with ``mean_in`` / ``std_in`` into one normalised with the release's mean / std;
    None when they are the same."""
    if tuple(release.mean) == tuple(mean_in) and tuple(release.std) == tuple(std_in):
        return None
    mean, std, mean_in, std_in = (torch.tensor(v, dtype=torch.float64)
                                  for v in (release.mean, release.std, mean_in, std_in))
    scale, shift = std_in / std, (mean_in - mean) / std
    return scale.float().view(1, 3, 1, 1), shift.float().view(1, 3, 1, 1)

