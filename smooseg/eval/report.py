"""Evaluation report pictures: per-class IoU bars, confusion heatmap, image/label/prediction grid.

``write_report(metrics.json)`` draws the three PNGs next to the JSON that ``eval_segmentation.py``
writes. Figures are built with matplotlib's object-oriented API (``Figure`` rendered by Agg), never
pyplot, so no global backend or figure state is touched and it works headless. Every PNG is
written atomically.
"""

import logging
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from smooseg.errors import SmoosegError
from smooseg.io import atomic_write
from smooseg.viz import read_metrics_json

log = logging.getLogger(__name__)

REPORT_FILES = {"iou": "per_class_iou.png", "confusion": "confusion.png", "examples": "examples.png"}
EXAMPLE_PARTS = ("img", "label", "pred")


def save_figure(fig, path, dpi=100):
    """Render ``fig`` to PNG at ``path`` atomically."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def ordered_confusion(confusion, assignment):
    """Row-normalised K×n confusion with rows reordered: row c is the cluster matched to class c,
    then the unmatched clusters in increasing order. Returns ``(matrix, cluster_of_each_row)``.

    Each row is divided by its sum (the share of a cluster's pixels in each class); rows without
    pixels stay zero.
    """
    m = np.asarray(confusion, dtype=np.float64)
    assignment = np.asarray(assignment, dtype=np.int64)
    if m.ndim != 2 or assignment.shape != (m.shape[1],):
        raise SmoosegError(f"confusion {m.shape} and assignment {assignment.shape} do not fit: "
                           "expected a K×n confusion and one cluster per class")
    rest = np.setdiff1d(np.arange(m.shape[0]), assignment)
    order = np.concatenate([assignment, rest])
    m = m[order]
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0), order


def iou_bar_chart(class_names, iou, path, title=None):
    """Horizontal bar per class of its IoU (in %); undefined IoUs (None/NaN) are marked n/a."""
    values = np.asarray([np.nan if v is None else float(v) for v in iou], dtype=np.float64)
    if len(values) != len(class_names):
        raise SmoosegError(f"iou_bar_chart: {len(class_names)} class names but {len(values)} IoUs")
    defined = ~np.isnan(values)
    n = len(values)
    fig = Figure(figsize=(7, 1.0 + 0.3 * n))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y[defined], values[defined], color="tab:blue")
    for i in range(n):
        label = f"{values[i]:.1f}" if defined[i] else "n/a"
        ax.text((values[i] if defined[i] else 0) + 1, i, label, va="center", fontsize=8,
                color="black" if defined[i] else "gray")
    if defined.any():
        mean = values[defined].mean()
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mIoU {mean:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, [str(c) for c in class_names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or "Per-class IoU")
    return save_figure(fig, path)


def confusion_heatmap(confusion, class_names, assignment, path, title=None):
    """Heatmap of :func:`ordered_confusion`: rows are clusters (matched class first), columns the
    ground-truth classes; a row shows how a cluster's pixels split over the classes."""
    matrix, order = ordered_confusion(confusion, assignment)
    n_clusters, n_classes = matrix.shape
    if len(class_names) != n_classes:
        raise SmoosegError(f"confusion_heatmap: {len(class_names)} class names for {n_classes} columns")
    rows = [f"{class_names[c]} ← cluster {k}" for c, k in enumerate(order[:n_classes])]
    rows += [f"cluster {k} (unmatched)" for k in order[n_classes:]]
    fig = Figure(figsize=(2.5 + 0.35 * n_classes, 1.5 + 0.35 * n_clusters))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(np.arange(n_classes), [str(c) for c in class_names], rotation=90, fontsize=8)
    ax.set_yticks(np.arange(n_clusters), rows, fontsize=8)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel("predicted cluster (its matched class)")
    if n_classes <= 16:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the cluster's pixels")
    ax.set_title(title or "Confusion (row-normalised)")
    return save_figure(fig, path)


def _as_rgb(item):
    if isinstance(item, (str, Path)):
        try:
            with Image.open(item) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise SmoosegError(f"cannot read example image {item} ({err}); re-run the evaluation") from None
    return np.asarray(item)


def example_grid(rows, path, titles=("image", "label", "prediction")):
    """One row per example of its pictures side by side (image | label | prediction).

    ``rows`` holds tuples of H×W×3 uint8 arrays or paths of image files.
    """
    rows = [[_as_rgb(x) for x in row] for row in rows]
    if not rows:
        raise SmoosegError("example_grid: no examples given; evaluate with n_images > 0")
    n_cols = max(len(r) for r in rows)
    height, width = rows[0][0].shape[:2]
    panel = 3.0
    fig = Figure(figsize=(panel * n_cols, panel * len(rows) * height / width + 0.4))
    axes = fig.subplots(len(rows), n_cols, squeeze=False, gridspec_kw={"wspace": 0.03, "hspace": 0.03})
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_axis_off()
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            if i == 0 and j < len(titles):
                ax.set_title(titles[j])
    return save_figure(fig, path)


def find_examples(folder):
    """Triplets ``(<n>_img.png, <n>_label.png, <n>_pred.png)`` present in ``folder``, by n."""
    folder = Path(folder)
    numbers = sorted(int(m.group(1)) for p in folder.glob("*_img.png")
                     if (m := re.fullmatch(r"(\d+)_img\.png", p.name)))
    triplets = [tuple(folder / f"{n}_{part}.png" for part in EXAMPLE_PARTS) for n in numbers]
    return [t for t in triplets if all(p.is_file() for p in t)]


def write_report(metrics_json_path, examples_dir=None, out_dir=None):
    """Draw the IoU bar chart, the confusion heatmap and the example grid of one evaluation.

    Reads ``metrics.json`` (and the ``<n>_{img,label,pred}.png`` examples from ``examples_dir``,
    default: the JSON's folder); writes the PNGs named in ``REPORT_FILES`` to ``out_dir``
    (default: the JSON's folder). A part whose data is missing (no confusion in the JSON, no
    examples) is skipped with a warning. Returns ``{part: path}`` of what was written.
    """
    metrics_json_path = Path(metrics_json_path)
    metrics = read_metrics_json(metrics_json_path)
    out_dir = Path(out_dir) if out_dir is not None else metrics_json_path.parent
    examples_dir = Path(examples_dir) if examples_dir is not None else metrics_json_path.parent
    names = metrics["class_names"]
    headline = [f"{key} {metrics[key]:.2f}" for key in ("mIoU", "Accuracy") if metrics[key] is not None]
    source = Path(metrics["checkpoint"]).stem if metrics["checkpoint"] else metrics_json_path.parent.name
    source = source.replace("$", r"\$")  # no mathtext in file names
    suffix = f" — {source}" + (f" ({', '.join(headline)})" if headline else "")
    written = {"iou": iou_bar_chart(names, metrics["iou"], out_dir / REPORT_FILES["iou"],
                                    title=f"Per-class IoU{suffix}")}
    if metrics["confusion"] is None:
        log.warning("%s holds no 'confusion'; skipping %s", metrics_json_path, REPORT_FILES["confusion"])
    else:
        written["confusion"] = confusion_heatmap(
            metrics["confusion"], names, metrics["assignment"], out_dir / REPORT_FILES["confusion"],
            title=f"Confusion (row-normalised){suffix}")
    examples = find_examples(examples_dir)
    if examples:
        written["examples"] = example_grid(examples, out_dir / REPORT_FILES["examples"])
    else:
        log.warning("no <n>_img/label/pred.png examples in %s; skipping %s", examples_dir,
                    REPORT_FILES["examples"])
    return written
