"""The types and ranges of the command-line settings, declared in one place and checked once,
before a run starts, so a bad value is one line naming the key and what it may be.

Each rule is ``key: (kind, low, high)``: ``int`` / ``float`` / ``list``; ``low`` and ``high`` are
inclusive bounds (None: unbounded) and a ``float`` rule with ``low`` given as ``(x,)`` excludes x
itself. A key set to null is left alone (null means "the default" where a config allows it).
A ``list`` key given a bare string (``datasets=cityscapes``) becomes a one-element list.
"""

import math

from omegaconf import OmegaConf

from smooseg.errors import SmoosegError

POSITIVE = (0.0,)  # a float bound that excludes 0

TRAIN = {
    "batch_size": ("int", 1, None), "res": ("int", 1, None), "val_res": ("int", 1, None),
    "eval_res": ("int", 1, None), "max_steps": ("int", 1, None), "val_check_interval": ("int", 1, None),
    "num_workers": ("int", 0, None), "seed": ("int", 0, None), "extra_clusters": ("int", 0, None),
    "n_log_images": ("int", 0, None), "hist_freq": ("int", 0, None),
    "loss.temperature": ("float", POSITIVE, None), "loss.ema_alpha": ("float", 0.0, 1.0),
    "loss.pos_intra_shift": ("float", None, None), "loss.neg_inter_shift": ("float", None, None),
    "optim.lr1": ("float", POSITIVE, None), "optim.lr2": ("float", POSITIVE, None),
    "optim.linear_lr": ("float", POSITIVE, None), "model.dim": ("int", 1, None),
    "cache.batch_size": ("int", 1, None), "final_eval.batch_size": ("int", 1, None),
    "final_eval.n_images": ("int", 0, None),
}
EVAL = {
    "model_paths": ("list", None, None), "eval_res": ("int", 1, None), "batch_size": ("int", 1, None),
    "num_workers": ("int", 0, None), "n_images": ("int", 0, None), "crf_timeout": ("float", POSITIVE, None),
}
SEGMENT = {
    "size": ("int", 1, None), "stride": ("int", 1, None), "batch_size": ("int", 1, None),
    "alpha": ("float", 0.0, 1.0), "crf_timeout": ("float", POSITIVE, None),
}
CROP = {
    "datasets": ("list", None, None), "splits": ("list", None, None), "crop_types": ("list", None, None),
    "crop_ratio": ("float", POSITIVE, 1.0), "seed": ("int", 0, None), "num_workers": ("int", 0, None),
    "jpeg_quality": ("int", 1, 100),
}
DOWNLOAD = {"datasets": ("list", None, None)}


def _range(kind, low, high):
    """E.g. "an integer >= 1", "a number > 0", "a number in [0, 1]"."""
    noun = "an integer" if kind == "int" else "a number"
    strict = isinstance(low, tuple)
    low = low[0] if strict else low
    if low is not None and high is not None:
        return f"{noun} in {'(' if strict else '['}{low}, {high}]"
    if low is not None:
        return f"{noun} {'>' if strict else '>='} {low}"
    return noun


def _fits(value, kind, low, high):
    if isinstance(value, bool):
        return False
    if kind == "int" and not isinstance(value, int):
        return False
    if kind == "float" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        return False
    strict = isinstance(low, tuple)
    bound = low[0] if strict else low
    if bound is not None and (value <= bound if strict else value < bound):
        return False
    return high is None or value <= high


def check_settings(cfg, rules):
    """Check every key of ``rules`` present in ``cfg`` (SmoosegError on the first bad one); bare
    strings of ``list`` keys are turned into one-element lists in place. Returns ``cfg``."""
    for key, (kind, low, high) in rules.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if kind == "list":
            if isinstance(value, str):
                OmegaConf.update(cfg, key, [value], merge=False)
            elif not OmegaConf.is_list(value) and not isinstance(value, (list, tuple)):
                raise SmoosegError(f"{key}={value} must be a list, e.g. {key}=[a,b]")
            continue
        if not _fits(value, kind, low, high):
            raise SmoosegError(f"{key}={value} is not allowed: {key} must be {_range(kind, low, high)}")
    return cfg
