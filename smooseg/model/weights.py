"""Official DINO / DINOv2 weights: the registry of backbones, their release files and URLs,
finding or downloading a file, and reading and converting it into a timm ViT.

Files are looked up in this order: an explicit ``weights_path``, the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``), then a download of the official URL into that cache.
There is no silent fallback to random weights.  Loading is strict: any missing, unexpected or
wrongly shaped tensor is a one-line error naming the file.
"""

import http.client
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from smooseg.errors import SmoosegError
from smooseg.io import check_input_file

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
        return check_input_file(weights_path, "model.weights_path",
                                fix=f"point it at the official file {filename}, or leave it unset "
                                    "to use the torch hub cache")
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


def _to_timm_layout(state_dict, vit):
    """Official DINOv2 names -> timm (``mask_token`` dropped, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``)
    through timm's own checkpoint filter; DINO files already use timm's names.

    The filter would silently resample a position embedding or patch projection of another shape,
    so those two are checked first: a file of another model is an error, never resized.
    """
    if "mask_token" not in state_dict:
        return dict(state_dict)
    expected = vit.state_dict()
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape:
            return dict(state_dict)  # left for the strict shape check to name
    return checkpoint_filter_fn(dict(state_dict), vit)


def _first(keys, n=5):
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def load_official_state_dict(model, state_dict, source: str):
    """Strictly load an official DINO/DINOv2 state dict into a timm ViT (or a Backbone).

    ``state_dict`` may be nested or prefixed as described in ``_unwrap``.  Any missing,
    unexpected or wrongly shaped key raises a one-line SmoosegError naming ``source``.
    """
    if not isinstance(model, VisionTransformer):
        model = model.model  # a Backbone
    state_dict = _unwrap(state_dict)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()):
        raise SmoosegError(f"weights {source} hold no state dict of tensors: use the official release file")
    state_dict = _to_timm_layout(state_dict, model)
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
