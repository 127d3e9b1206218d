"""Where a result comes from: what ``metrics.json`` and ``summary.json`` record under ``provenance``.

``provenance`` has four parts:
  * ``evaluation``: the settings that change the numbers: ``dataset``, ``split``, ``eval_res``,
    ``crop``, ``flip``, ``crf``, ``crf_backend`` (null without the CRF), ``precision``, ``n_images``;
  * ``checkpoint``: ``path``, ``sha256`` (of the file's bytes), ``backbone`` (arch, model_type,
    patch_size) and ``weights`` (the official release file the backbone started from, or
    ``random init``);
  * ``software``: ``smooseg``, ``git_commit`` (null outside a git checkout), ``torch``, ``timm``,
    ``python``;
  * ``device`` and ``date`` (UTC, ISO 8601).

Two results are comparable when their ``evaluation`` parts are equal (:func:`setting_differences`);
``eval_segmentation.py --compare a.json b.json`` prints both side by side, and the summary over
several checkpoints refuses to average results whose settings differ.
"""

import datetime
import functools
import hashlib
import platform
import subprocess
from pathlib import Path

import timm
import torch

import smooseg
from smooseg.errors import SmoosegError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Settings that may differ between averaged results (each result names its own checkpoint).
PER_RESULT = ("n_images",)


@functools.lru_cache(maxsize=64)
def _sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path):
    """Hex sha256 of the file at ``path`` (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def git_commit():
    """The commit of the checkout this package runs from (``+dirty`` with local changes), or None."""
    try:
        run = functools.partial(subprocess.run, cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode != 0:
            return None
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def software():
    """Versions of this package and what its numbers depend on."""
    return {"smooseg": smooseg.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _weights_file(net_hparams, pretrained):
    if not pretrained:
        return "random init"
    from smooseg.model.weights import official_weights

    try:
        return official_weights(net_hparams["arch"], net_hparams["model_type"], net_hparams["patch_size"])[0]
    except (SmoosegError, KeyError):
        return None


def checkpoint_record(path, hparams):
    """The ``checkpoint`` part for a checkpoint file at ``path`` (None: a net handed over in memory)."""
    net = hparams.get("net", {})
    pretrained = hparams.get("runtime", {}).get("pretrained", True)
    return {"path": None if path is None else str(Path(path).resolve()),
            "sha256": None if path is None else file_sha256(path),
            "backbone": {key: net.get(key) for key in ("arch", "model_type", "patch_size")},
            "weights": _weights_file(net, pretrained)}


def record(evaluation, checkpoint, device):
    """The whole ``provenance`` dict of one result."""
    return {"evaluation": dict(evaluation), "checkpoint": dict(checkpoint), "software": software(),
            "device": str(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def eval_record(settings, dataset, data_name, crf_backend, precision):
    """The ``evaluation`` part of an evaluation with ``settings`` (the keys of ``eval.yaml``) over
    ``dataset`` (its transform gives ``eval_res`` and the crop)."""
    transform = dataset.transform
    return {"dataset": data_name, "split": str(settings.split), "eval_res": transform.res,
            "crop": transform.crop, "flip": bool(settings.flip), "crf": crf_backend is not None,
            "crf_backend": crf_backend, "precision": str(precision), "n_images": len(dataset)}


def setting_differences(first, second, ignore=PER_RESULT):
    """``{key: (first's, second's)}`` of the evaluation settings two provenance records disagree on;
    a record without provenance counts as all unknown."""
    a = (first or {}).get("evaluation") or {}
    b = (second or {}).get("evaluation") or {}
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key) != b.get(key)}


def check_same_settings(runs):
    """SmoosegError unless every run (a dict with ``provenance`` and ``checkpoint``) was evaluated
    with the same settings, so that averaging them means something."""
    runs = [run for run in runs if run.get("provenance") is not None]
    for run in runs[1:]:
        diff = setting_differences(runs[0]["provenance"], run["provenance"])
        if diff:
            said = ", ".join(f"{key} {a!r} vs {b!r}" for key, (a, b) in diff.items())
            raise SmoosegError(f"will not average {runs[0]['checkpoint']} and {run['checkpoint']}: they were "
                               f"evaluated with different settings ({said}); evaluate them with the same "
                               "settings (dataset, split, eval_res, crop, flip, crf) or summarise them apart")


def _read_result(path):
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SmoosegError(f"{path} not found; pass two metrics.json or summary.json files") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SmoosegError(f"{path} is unreadable ({' '.join(str(err).split())}); pass a metrics.json or "
                           "summary.json written by eval_segmentation.py") from None
    if not isinstance(data, dict):
        raise SmoosegError(f"{path} is not a metrics.json or summary.json; pass one written by "
                           "eval_segmentation.py")
    return data


def _headline(data, key):
    value = data.get(key)
    value = value.get("mean") if isinstance(value, dict) else value
    return "-" if value is None else f"{value:.2f}"


def _flat(record, prefix=""):
    rows = {}
    for key, value in (record or {}).items():
        if isinstance(value, dict):
            rows.update(_flat(value, f"{prefix}{key}."))
        else:
            rows[f"{prefix}{key}"] = value
    return rows


def compare_files(first, second):
    """``(text, same)``: two results (metrics.json or summary.json) side by side, every provenance
    field and the headline numbers, differing rows marked ``*``; ``same`` when their evaluation
    settings agree (:func:`setting_differences`)."""
    a, b = _read_result(first), _read_result(second)
    rows_a, rows_b = _flat(a.get("provenance")), _flat(b.get("provenance"))
    keys = list(dict.fromkeys([*rows_a, *rows_b]))
    width = max([len(k) for k in keys] + [len("Accuracy")])
    lines = [f"  {'':<{width}}  A: {first}", f"  {'':<{width}}  B: {second}"]
    for key in keys:
        va, vb = rows_a.get(key), rows_b.get(key)
        lines.append(f"{'*' if va != vb else ' '} {key:<{width}}  {va}  |  {vb}")
    for key in ("mIoU", "Accuracy"):
        lines.append(f"  {key:<{width}}  {_headline(a, key)}  |  {_headline(b, key)}")
    diff = setting_differences(a.get("provenance"), b.get("provenance"))
    if a.get("provenance") is None or b.get("provenance") is None:
        lines.append("cannot compare settings: a file records no provenance (written by an older version)")
        return "\n".join(lines), False
    lines.append("same evaluation settings" if not diff else
                 "different evaluation settings: " + ", ".join(diff) + " (do not average these)")
    return "\n".join(lines), not diff
