"""SmooSeg checkpoints without Lightning: read them safely, convert every layout in one place,
and rebuild the :class:`SmooSegNet` they hold (docs/method.md section 9).

Three layouts are read:

* this package's (layout 2): ``hyper_parameters`` grouped as ``net`` / ``data`` / ``loss`` /
  ``optim`` / ``metrics`` / ``diagnostics`` / ``runtime``, state-dict keys ``net.*``;
* this package's earlier layout: flat hyper-parameters, keys ``backbone.*``, ``projector.*``,
  ``predictor.*`` (and ``linear_probe.*``);
* the reference release's: ``net.model.*`` (DINO ViT), ``projection.*``, ``prediction.*`` and a
  training ``cfg``.

Unpickling is weights-only (``torch.load(..., weights_only=True)``); the only extra classes
allowed are the OmegaConf containers (and the plain types they reference) that the reference
files keep their training cfg in. A file that asks for anything else is refused before any of
its code can run.
"""

import collections
import dataclasses
import pickle
import typing
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from smooseg.errors import SmoosegError
from smooseg.model.backbones import backbone_spec
from smooseg.model.losses import LossConfig
from smooseg.model.net import NetConfig, SmooSegNet
from smooseg.model.weights import load_official_state_dict

CHECKPOINT_LAYOUT = 2

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
    """Grouped hyper-parameters from a reference checkpoint's ``n_classes`` and training ``cfg``."""
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
    return grouped_from_flat(dict(
        n_classes=int(hyper_parameters["n_classes"]), dataset_name=dataset_name,
        arch=arch, model_type=cfg["model_type"], patch_size=int(cfg["dino_patch_size"]),
        feat_type=_cfg_get(cfg, "dino_feat_type", "feat"),
        fit=backbone_spec(arch, cfg["model_type"], cfg["dino_patch_size"]).fit,
        dim=int(cfg["dim"]), projection_type=_cfg_get(cfg, "projection_type", "nonlinear"),
        dropout=bool(_cfg_get(cfg, "dropout", True)), extra_clusters=int(_cfg_get(cfg, "extra_clusters", 0)),
        temperature=float(_cfg_get(cfg, "temperature", 0.1)), ema_alpha=float(_cfg_get(cfg, "alpha", 0.998)),
        pos_intra_shift=float(_cfg_get(cfg, "pos_intra_shift", -0.02)),
        neg_inter_shift=float(_cfg_get(cfg, "neg_inter_shift", 0.5)),
        pointwise=bool(_cfg_get(cfg, "pointwise", True)),
        lr1=float(_cfg_get(cfg, "lr1", 1e-4)), lr2=float(_cfg_get(cfg, "lr2", 5e-4))))


def data_fields(flat):
    """The ``data`` group: the data set's name, class count and names, folder, ``eval_res`` and image
    interpolation as plain values (None: the data set's own, filled in by
    :class:`smooseg.data.info.DatasetInfo` when the checkpoint is used)."""
    names = flat.get("class_names")
    return {"n_classes": int(flat["n_classes"]), "name": flat.get("dataset_name", "directory"),
            "class_names": None if names is None else list(names), "dir_name": flat.get("dir_name"),
            "eval_res": flat.get("eval_res"), "image_interp": flat.get("image_interp", "nearest")}


def grouped_from_flat(flat):
    """Grouped hyper-parameters from flat ones (this package's earlier layout: the keyword names of
    NetConfig, the data set's fields (``dataset_name``, :func:`data_fields`), LossConfig, OptimConfig
    and the module's own)."""
    get = flat.get
    n_classes = int(flat["n_classes"])
    return {
        "layout": CHECKPOINT_LAYOUT,
        "net": NetConfig(
            n_clusters=n_classes + int(get("extra_clusters") or 0), arch=get("arch", "dino"),
            model_type=get("model_type", "vit_small"), patch_size=int(get("patch_size", 8)),
            feat_type=get("feat_type", "feat"), fit=get("fit", "error"), dim=int(get("dim", 64)),
            projection_type=get("projection_type", "nonlinear"), dropout=bool(get("dropout", True)),
            linear_probe_classes=n_classes if get("linear_probe") else None).to_dict(),
        "data": data_fields(flat),
        "loss": {f.name: flat[f.name] for f in dataclasses.fields(LossConfig) if f.name in flat},
        "optim": {k: flat[k] for k in ("lr1", "lr2", "linear_lr") if k in flat},
        "metrics": {"mask_extra_clusters": bool(get("mask_extra_clusters", False))},
        "diagnostics": {"n_log_images": int(get("n_log_images", 4)), "hist_freq": int(get("hist_freq") or 0)},
        "runtime": {"compile": bool(get("compile", False)), "fused_attn": bool(get("fused_attn", True)),
                    "backbone_precision": str(get("backbone_precision", "auto"))},
    }


def is_grouped(hyper_parameters):
    return isinstance(hyper_parameters, Mapping) and isinstance(hyper_parameters.get("net"), Mapping)


def grouped_hparams(ckpt, path):
    """The grouped hyper-parameters of a checkpoint of any of the three layouts."""
    hyper_parameters = ckpt.get("hyper_parameters") or {}
    if is_reference_layout(ckpt["state_dict"]):
        return reference_hparams(hyper_parameters, path)
    if is_grouped(hyper_parameters):
        return dict(hyper_parameters)
    if "n_classes" not in hyper_parameters:
        raise _not_a_checkpoint(path, "its hyper_parameters lack n_classes")
    return grouped_from_flat(dict(hyper_parameters))


def upgrade_checkpoint(ckpt):
    """Convert a training checkpoint of the earlier layout to this one, in place (for resuming):
    grouped hyper-parameters, state-dict keys under ``net.``. Checkpoints of this layout and the
    reference's are left as they are."""
    state_dict = ckpt.get("state_dict") or {}
    if is_reference_layout(state_dict) or is_grouped(ckpt.get("hyper_parameters")):
        return ckpt
    if "n_classes" in (ckpt.get("hyper_parameters") or {}):
        ckpt["hyper_parameters"] = grouped_from_flat(dict(ckpt["hyper_parameters"]))
    ckpt["state_dict"] = {k if k.startswith("net.") else f"net.{k}": v for k, v in state_dict.items()}
    return ckpt


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


def build_net(hparams, path, **runtime):
    """A :class:`SmooSegNet` (random weights) of the checkpoint's ``net`` group."""
    try:
        config = NetConfig.from_dict(hparams["net"])
    except (TypeError, ValueError, KeyError) as err:
        raise SmoosegError(f"checkpoint {path} has hyper_parameters this version cannot use ({err}); "
                           "re-train or use a matching smooseg version") from None
    return SmooSegNet(config, pretrained=False, **runtime)


def _net_state_dict(state_dict):
    """The net's own keys of a state dict of this layout (``net.*``) or the earlier one (no prefix)."""
    if any(k.startswith("net.") for k in state_dict):
        return {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
    return dict(state_dict)


def load_net(path, map_location="cpu", **runtime):
    """Rebuild the :class:`SmooSegNet` (eval mode) of a checkpoint of any layout and return
    ``(net, hparams)`` with the grouped hyper-parameters (``hparams["data"]`` names the data set).

    The backbone is built without pretrained weights and filled from the checkpoint, so no DINO
    file is needed. ``runtime`` goes to :class:`SmooSegNet` (e.g. ``backbone_precision``).
    """
    ckpt = read_checkpoint(path, map_location)
    state_dict = dict(ckpt["state_dict"])
    hparams = grouped_hparams(ckpt, path)
    net = build_net(hparams, path, **runtime)
    describe = NetConfig.from_dict(hparams["net"]).describe() + " its hyper_parameters describe"
    if is_reference_layout(state_dict):
        backbone, heads = split_reference_state_dict(state_dict)
        expected = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")}
        check_state_dict(expected, heads, path, describe)
        load_official_state_dict(net.backbone.model, backbone, f"{path} (net.model.*)")
        net.load_state_dict({**net.backbone.state_dict(prefix="backbone."), **heads})
    else:
        state_dict = _net_state_dict(state_dict)
        check_state_dict(net.state_dict(), state_dict, path, describe)
        net.load_state_dict(state_dict)
    return net.to(map_location).eval(), hparams
