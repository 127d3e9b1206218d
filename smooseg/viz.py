"""Colour maps (class colours come from the data set specs), coloured label images, overlays and
PNG writing (plotting lives here only)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from smooseg.data.registry import find_spec
from smooseg.data.spec import pascal_colors
from smooseg.errors import SmoosegError
from smooseg.io import atomic_write

IGNORE_COLOR = (0, 0, 0)


def colormap(dataset_name, n):
    """An ``n``×3 uint8 palette: the class colours of data set ``dataset_name`` (its spec's), then
    Pascal colours that none of them uses (clusters beyond the classes, sets without colours)."""
    spec = find_spec(dataset_name)
    base = list(spec.colors) if spec is not None else []
    colors = base[:n]
    if len(colors) < n:
        extra = [c for c in pascal_colors(n + len(base)) if c not in colors]
        colors += extra[: n - len(colors)]
    return np.asarray(colors, dtype=np.uint8)


def colorize(label, palette):
    """Colour an integer H×W label map; negative ids (ignore / unmatched) are black."""
    label = np.asarray(label)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    out[~valid] = IGNORE_COLOR
    return out


def overlay(image, color_mask, alpha=0.5):
    """Blend an H×W×3 uint8 colour mask over an H×W×3 uint8 image."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * color_mask.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def save_png(array, path):
    """Write an H×W(×3) uint8 array as PNG atomically."""
    path = Path(path)
    with atomic_write(path, durable=False) as tmp:  # one of many: not flushed one by one
        Image.fromarray(np.asarray(array)).save(tmp, format="PNG")
    return path


def read_metrics_json(path):
    """The parts of an evaluation ``metrics.json`` that pictures need, as arrays.

    Returns dict(class_names=list, iou=float64 ndarray (NaN where undefined), assignment=int64
    ndarray (matched cluster of each class), confusion=K×n int64 ndarray or None, mIoU, Accuracy,
    checkpoint, checkpoint_sha256 (None when not recorded)).
    """
    path = Path(path)
    hint = "pass the metrics.json written by eval_segmentation.py"
    if not path.is_file():
        raise SmoosegError(f"metrics JSON {path} not found; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise SmoosegError(f"metrics JSON {path} is unreadable ({reason}); {hint}") from None
    assignment = data.get("assignment") if isinstance(data, dict) else None
    if not isinstance(assignment, dict) or not assignment:
        raise SmoosegError(f"metrics JSON {path} has no 'assignment' (class -> cluster) table; {hint}")
    names = list(assignment)
    per_class = data.get("per_class_iou") or {}
    try:
        clusters = np.asarray([int(assignment[n]) for n in names], dtype=np.int64)
        iou = np.asarray([np.nan if per_class.get(n) is None else float(per_class[n]) for n in names])
        confusion = data.get("confusion")
        confusion = None if confusion is None else np.asarray(confusion, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise SmoosegError(f"metrics JSON {path} holds a malformed value ({err}); {hint}") from None
    if len(set(clusters.tolist())) != len(clusters) or (clusters < 0).any():
        raise SmoosegError(f"metrics JSON {path}: 'assignment' must map each class to a distinct "
                           f"cluster >= 0; {hint}")
    if confusion is not None and (confusion.ndim != 2 or confusion.shape[1] != len(names)
                                  or confusion.shape[0] <= clusters.max()):
        raise SmoosegError(f"metrics JSON {path}: 'confusion' has shape {confusion.shape}, expected "
                           f"K×{len(names)} with K > {clusters.max()}; {hint}")
    return {"class_names": names, "iou": iou, "assignment": clusters, "confusion": confusion,
            "mIoU": data.get("mIoU"), "Accuracy": data.get("Accuracy"),
            "checkpoint": data.get("checkpoint"), "checkpoint_sha256": _recorded_sha256(data)}


def _recorded_sha256(metrics):
    """The checkpoint sha256 a metrics.json records (``provenance.checkpoint.sha256``), or None."""
    provenance = metrics.get("provenance")
    checkpoint = provenance.get("checkpoint") if isinstance(provenance, dict) else None
    sha = checkpoint.get("sha256") if isinstance(checkpoint, dict) else None
    return sha if isinstance(sha, str) else None


def class_colors(cluster_to_class, palette):
    """K×3 colours of the clusters: a matched cluster takes its class colour, unmatched clusters
    (class −1) take the palette entries after the classes, one distinct colour each."""
    cluster_to_class = np.asarray(cluster_to_class, dtype=np.int64)
    n_classes = int((cluster_to_class >= 0).sum())
    index = cluster_to_class.copy()
    unmatched = np.flatnonzero(cluster_to_class < 0)
    index[unmatched] = n_classes + np.arange(len(unmatched))
    if index.max(initial=-1) >= len(palette):
        raise SmoosegError(f"palette has {len(palette)} colours but {index.max() + 1} are needed; "
                           "build it with colormap(dataset_name, n_clusters)")
    return np.asarray(palette, dtype=np.uint8)[index]


def legend_image(names, colors, swatch=20, font_size=14, pad=6):
    """An H×W×3 uint8 legend: one row per entry, a colour swatch then its name, on white."""
    if len(names) != len(colors):
        raise SmoosegError(f"legend: {len(names)} names but {len(colors)} colours; pass one colour per name")
    font = ImageFont.load_default(size=font_size)
    text_width = max([int(font.getlength(str(n))) for n in names] + [1])
    row = max(swatch, font_size + 4)
    canvas = Image.new("RGB", (pad * 3 + swatch + text_width, pad + len(names) * (row + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        top = pad + i * (row + pad)
        draw.rectangle([pad, top, pad + swatch - 1, top + swatch - 1],
                       fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((pad * 2 + swatch, top + swatch // 2), str(name), fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)
