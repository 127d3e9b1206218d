"""Load SmooSeg checkpoints safely: this package's own files and the reference release's (SPEC §9).

Unpickling is weights-only (``torch.load(..., weights_only=True)``); the only extra classes
allowed are the OmegaConf containers (and the plain types they reference) that the reference
files keep their training cfg in. A file that asks for anything else is refused before any of
its code can run.
"""

import collections
import pickle
import typing
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from smooseg.backbone import load_official_state_dict
from smooseg.data.datasets import CLASS_NAMES
from smooseg.errors import SmoosegError
from smooseg.module import SmooSegModule

# What a pickled OmegaConf cfg (as written by the reference release) contains besides tensors.
SAFE_GLOBALS = [
    DictConfig, ListConfig, ContainerMetadata, Metadata,
    AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode,
    typing.Any, dict, list, int, float, bool, str, collections.defaultdict,
]

# Reference state-dict prefixes -> this package's module names.
REFERENCE_PREFIXES = (
    ("projection.cluster1.0.", "projector.linear."),
    ("projection.cluster2.", "projector.nonlinear."),
)
REFERENCE_PROTOTYPES = {
    "prediction.local_clusters": "predictor.student",
    "prediction.global_clusters": "predictor.teacher",
}
REFERENCE_BACKBONE = "net.model."


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict of ``path`` via weights-only unpickling; SmoosegError when unusable."""
    path = Path(path)
    if not path.is_file():
        raise SmoosegError(f"checkpoint {path} not found; pass the path of a .ckpt file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text:
            culprit = text.split("Unsupported global:", 1)[1].split("was not")[0].strip()
            raise SmoosegError(
                f"checkpoint {path} was refused: it asks to load {culprit}, which could run code; "
                f"only tensors and OmegaConf configs are allowed, so use a trusted SmooSeg checkpoint"
            ) from None
        raise _not_a_checkpoint(path, "it is not a PyTorch pickle") from None
    except Exception as err:  # noqa: BLE001 - unpickling garbage raises arbitrary types
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise _not_a_checkpoint(path, reason) from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise _not_a_checkpoint(path, "it holds no 'state_dict'")
    return ckpt


def _not_a_checkpoint(path, reason):
    return SmoosegError(f"{path} is not a SmooSeg checkpoint ({reason}); pass a .ckpt file written "
                        "by train_segmentation.py or the reference release")


def is_reference_layout(state_dict):
    """True for the reference release's key layout (``net.model.*``, ``projection.*``, ``prediction.*``)."""
    return any(k.startswith(REFERENCE_BACKBONE) or k in REFERENCE_PROTOTYPES for k in state_dict)


def _cfg_get(cfg, key, default):
    value = cfg.get(key, default)
    return default if value is None else value


def reference_hparams(hyper_parameters, path):
    """SmooSegModule arguments from a reference checkpoint's ``n_classes`` and training ``cfg``."""
    cfg = hyper_parameters.get("cfg")
    if "n_classes" not in hyper_parameters or not isinstance(cfg, (DictConfig, Mapping)):
        raise SmoosegError(f"reference checkpoint {path} lacks hyper_parameters n_classes/cfg; "
                           "it cannot be rebuilt: use a checkpoint saved by the reference training")
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    missing = [k for k in ("model_type", "dino_patch_size", "dim") if k not in cfg]
    if missing:
        raise SmoosegError(f"reference checkpoint {path}: cfg lacks {', '.join(missing)}; "
                           "it cannot be rebuilt from this file")
    arch = _cfg_get(cfg, "arch", "dino")
    dataset_name = str(_cfg_get(cfg, "dataset_name", "directory"))
    n_classes = int(hyper_parameters["n_classes"])
    names = CLASS_NAMES.get(dataset_name)
    return dict(
        n_classes=n_classes,
        dataset_name=dataset_name,
        class_names=list(names) if names and len(names) == n_classes else None,
        arch=arch,
        model_type=cfg["model_type"],
        patch_size=int(cfg["dino_patch_size"]),
        feat_type=_cfg_get(cfg, "dino_feat_type", "feat"),
        fit="resize" if arch == "dinov2" else "error",
        dim=int(cfg["dim"]),
        projection_type=_cfg_get(cfg, "projection_type", "nonlinear"),
        dropout=bool(_cfg_get(cfg, "dropout", True)),
        extra_clusters=int(_cfg_get(cfg, "extra_clusters", 0)),
        temperature=float(_cfg_get(cfg, "temperature", 0.1)),
        ema_alpha=float(_cfg_get(cfg, "alpha", 0.998)),
        pos_intra_shift=float(_cfg_get(cfg, "pos_intra_shift", -0.02)),
        neg_inter_shift=float(_cfg_get(cfg, "neg_inter_shift", 0.5)),
        pointwise=bool(_cfg_get(cfg, "pointwise", True)),
        lr1=float(_cfg_get(cfg, "lr1", 1e-4)),
        lr2=float(_cfg_get(cfg, "lr2", 5e-4)),
        eval_res=224 if dataset_name.startswith("potsdam") else 320,
    )


def split_reference_state_dict(state_dict):
    """Split a reference state dict into (backbone dict in DINO naming, heads dict in our naming)."""
    backbone, heads = {}, {}
    for key, value in state_dict.items():
        if key.startswith(REFERENCE_BACKBONE):
            backbone[key[len(REFERENCE_BACKBONE):]] = value
        elif key in REFERENCE_PROTOTYPES:
            heads[REFERENCE_PROTOTYPES[key]] = value
        else:
            for old, new in REFERENCE_PREFIXES:
                if key.startswith(old):
                    heads[new + key[len(old):]] = value
                    break
            else:
                heads[key] = value  # unknown: reported as unexpected by check_state_dict
    return backbone, heads


def check_state_dict(expected, found, path, model):
    """SmoosegError naming the first missing/unexpected key or shape mismatch between two state dicts.

    ``model`` describes what the file should fit, e.g. "the dino/vit_small/8 dim=64 model".
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = [f"{kind} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                 for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise SmoosegError(f"checkpoint {path} does not fit {model}: {'; '.join(parts)}; "
                           "the file is damaged or from another model")
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise SmoosegError(
                f"checkpoint {path} does not fit {model}: {key} has shape {tuple(value.shape)} "
                f"in the file but {tuple(expected[key].shape)} "
                "in the model; fix the architecture settings (arch/model_type/patch_size/dim)")


def describe_model(hp, whose="its hyper_parameters describe"):
    """E.g. "the dino/vit_small/8 dim=64 model its hyper_parameters describe"."""
    return f"the {hp['arch']}/{hp['model_type']}/{hp['patch_size']} dim={hp.get('dim', 64)} model {whose}"


def _build(hparams, path):
    hparams = dict(hparams, pretrained=False, weights_path=None)
    try:
        return SmooSegModule(**hparams)
    except TypeError as err:
        raise SmoosegError(f"checkpoint {path} has hyper_parameters this version cannot use ({err}); "
                           "re-train or use a matching smooseg version") from None


def load_module(path, map_location="cpu"):
    """Rebuild a :class:`SmooSegModule` (eval mode) from a native or reference-layout checkpoint.

    The backbone is built without pretrained weights and filled from the checkpoint, so no DINO
    file is needed.
    """
    ckpt = read_checkpoint(path, map_location)
    state_dict = dict(ckpt["state_dict"])
    hyper_parameters = ckpt.get("hyper_parameters") or {}
    if is_reference_layout(state_dict):
        hparams = reference_hparams(hyper_parameters, path)
        module = _build(hparams, path)
        backbone, heads = split_reference_state_dict(state_dict)
        expected = {k: v for k, v in module.state_dict().items() if not k.startswith("backbone.")}
        check_state_dict(expected, heads, path, describe_model(hparams))
        load_official_state_dict(module.backbone.model, backbone, f"{path} (net.model.*)")
        module.load_state_dict({**module.backbone.state_dict(prefix="backbone."), **heads})
    else:
        if "n_classes" not in hyper_parameters:
            raise _not_a_checkpoint(path, "its hyper_parameters lack n_classes")
        module = _build(hyper_parameters, path)
        check_state_dict(module.state_dict(), state_dict, path, describe_model(module.hparams))
        module.load_state_dict(state_dict)
    return module.to(map_location).eval()
