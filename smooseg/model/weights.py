"""Backbone weights: finding or downloading a release file, reading it, and loading it
strictly into a timm model through the backbone spec's converter (:mod:`smooseg.model.backbones`).

``model.weights_source=official`` (default) reads the official release file, looked up in this
order: an explicit ``weights_path``, the torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``),
then a download of the official URL (or ``weights_url``) into that cache; gated files (DINOv3) are
never fetched without ``weights_url``.  ``weights_source=timm`` reads timm's own copy of the same
weights (timm's key layout) from ``weights_path`` or the Hugging Face cache.  There is no silent
fallback to random weights.  Loading is strict: any missing, unexpected or wrongly shaped tensor is
a one-line error naming the file.
"""

import http.client
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models import get_pretrained_cfg

from smooseg.errors import SmoosegError
from smooseg.io import check_input_file
from smooseg.model.backbones import BackboneSpec, Release, backbone_spec

WEIGHTS_SOURCES = ("official", "timm")

_NEST_KEYS = ("teacher", "student", "model", "state_dict")
_STRIP_PREFIXES = ("module.", "backbone.")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_name(arch: str, model_type: str, patch_size: int) -> str:
    """timm model name (with the default release's tag) of a (arch, model_type, patch_size)
    triple; SmoosegError naming the valid choices if unsupported."""
    spec = backbone_spec(arch, model_type, patch_size)
    return f"{spec.timm_model}.{spec.releases[0].timm_tag}"


def official_weights(arch, model_type, patch_size, weights_data=None):
    """(filename, url) of the official release file for this backbone."""
    spec = backbone_spec(arch, model_type, patch_size)
    release = spec.release(weights_data)
    return release.filename, spec.url(release)


def weights_cache_path(filename) -> Path:
    """Where the torch hub cache keeps ``filename`` (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _download(url, cache, filename, spec):
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cache), progress=True)
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = " ".join(str(err).split())
        raise SmoosegError(
            f"could not get {spec.arch} weights {filename} from {url} ({type(err).__name__}: {reason}): "
            f"put the official file at {cache} or set model.weights_path=..., "
            f"or model.pretrained=false for random init (testing only)") from err


def _official_file(spec: BackboneSpec, release: Release, weights_path, weights_url) -> Path:
    filename = release.filename
    if weights_path is not None:
        return check_input_file(weights_path, "model.weights_path",
                                fix=f"point it at the official file {filename}, or leave it unset "
                                    "to use the torch hub cache")
    cache = weights_cache_path(filename)
    if cache.is_file():
        return cache
    if spec.gated and not weights_url:
        raise SmoosegError(
            f"{spec.arch} weights {filename} are not at {cache}: {spec.access}; then put the file "
            f"there or set model.weights_path=..., or set model.weights_url=<the URL you received>")
    _download(weights_url or spec.url(release), cache, filename, spec)
    return cache


def timm_hub_id(spec: BackboneSpec, release: Release) -> str:
    """The Hugging Face repository of timm's copy of a release (timm's pretrained config)."""
    return get_pretrained_cfg(f"{spec.timm_model}.{release.timm_tag}").hf_hub_id


def _timm_file(spec: BackboneSpec, release: Release, weights_path) -> Path:
    from huggingface_hub import try_to_load_from_cache

    repo = timm_hub_id(spec, release)
    if weights_path is not None:
        return check_input_file(weights_path, "model.weights_path",
                                fix=f"point it at timm's file from {repo}, or leave it unset "
                                    "to use the Hugging Face cache")
    for name in _HF_FILES:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    raise SmoosegError(
        f"timm's copy of {spec.key} weights ({repo}) is not in the Hugging Face cache: run "
        f"`hf download {repo}` where a network is available, set model.weights_path=<its "
        f"model.safetensors>, or use model.weights_source=official")


def resolve_weights(arch, model_type, patch_size, weights_path=None, weights_url=None, weights_data=None,
                    weights_source="official") -> Path:
    """Local path of the weights file (see the module docstring for the lookup order).

    ``weights_url`` replaces the official URL of the file (a mirror, or the personal URL of a
    gated release); the cached file keeps the official file name.
    """
    spec = backbone_spec(arch, model_type, patch_size)
    release = spec.release(weights_data)
    if weights_source == "official":
        return _official_file(spec, release, weights_path, weights_url)
    if weights_source == "timm":
        return _timm_file(spec, release, weights_path)
    raise SmoosegError(f"unknown model.weights_source={weights_source}: choose one of "
                       f"{', '.join(WEIGHTS_SOURCES)}")


def read_weights(path):
    """Load a weights file with weights-only unpickling onto the CPU."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
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


def _first(keys, n=5):
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def load_official_state_dict(model, state_dict, source: str, convert=None):
    """Strictly load a backbone state dict into a timm model (or a Backbone).

    ``state_dict`` may be nested or prefixed as described in ``_unwrap``.  ``convert(state_dict,
    model)`` maps it to timm's names (a Backbone's default: its spec's converter; otherwise the
    dict is taken to be in timm's layout).  Tensors are copied in the model's own dtypes (DINOv3's
    bf16 RoPE periods into fp32).  Any missing, unexpected or wrongly shaped key raises a one-line
    SmoosegError naming ``source``.
    """
    if hasattr(model, "spec") and hasattr(model, "model"):  # a Backbone
        convert = convert or model.spec.convert
        model = model.model
    state_dict = _unwrap(state_dict)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()):
        raise SmoosegError(f"weights {source} hold no state dict of tensors: use the official release file")
    if convert is not None:
        state_dict = convert(dict(state_dict), model)
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
