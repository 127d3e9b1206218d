"""What an evaluation leaves behind: the JSON-ready metrics, the printed per-class table,
the example pictures (``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png``, and
``<source stem>_side.png``: image | overlay | prediction | ground truth) and the summary over
several evaluations (mean ± sample std, min, max of mIoU and Accuracy: ``summary.json``), each
with its provenance (:mod:`smooseg.eval.provenance`).

One evaluation invocation holds ``<output_dir>/.eval.lock`` (:func:`claim_results_dir`) while it
writes, so two evaluations into one folder at once cannot mix their results: the second is
refused. The kernel drops the lock when its process dies, so a killed evaluation never blocks it.
"""

import contextlib
import fcntl
import math
import os
import re
import statistics
from pathlib import Path

import numpy as np

from smooseg.errors import SmoosegError
from smooseg.eval.metrics import cluster_to_class_map
from smooseg.eval.pictures import side_by_side
from smooseg.eval.provenance import check_same_settings
from smooseg.io import write_json
from smooseg.viz import colorize, colormap, legend_image, save_png


def _clean(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize(result, class_names):
    """JSON-ready metrics: mIoU, Accuracy, per-class IoU, class -> cluster assignment, confusion (K×n)."""
    return {
        "mIoU": _clean(float(result["mIoU"])),
        "Accuracy": _clean(float(result["Accuracy"])),
        "per_class_iou": {name: _clean(float(v))
                          for name, v in zip(class_names, result["iou"].tolist(), strict=True)},
        "assignment": {name: int(k)
                       for name, k in zip(class_names, result["assignment"].tolist(), strict=True)},
        "confusion": result["confusion"].tolist(),
    }


NO_LABELLED_PIXEL = ("no score: no pixel of these images has a class label (every label is the ignore "
                     "value); check the label files")


def format_table(metrics, class_names, crf_metrics=None):
    """Per-class IoU table (and CRF column) followed by the two headline numbers."""
    width = max(len(n) for n in class_names + ["class"])
    header = f"{'class':<{width}}  cluster  {'IoU':>6}" + ("  IoU+CRF" if crf_metrics else "")
    lines = [header, "-" * len(header)]

    def cell(v):
        return "     -" if v is None else f"{v:6.2f}"

    for name in class_names:
        line = f"{name:<{width}}  {metrics['assignment'][name]:>7}  {cell(metrics['per_class_iou'][name])}"
        if crf_metrics:
            line += f"  {cell(crf_metrics['per_class_iou'][name]):>7}"
        lines.append(line)
    lines.append("-" * len(header))
    head = crf_metrics or metrics
    tag = " (CRF)" if crf_metrics else ""
    lines.append(f"mIoU{tag}: {cell(head['mIoU']).strip()}   Accuracy{tag}: {cell(head['Accuracy']).strip()}")
    if crf_metrics:
        lines.append(f"without CRF: mIoU {cell(metrics['mIoU']).strip()}   "
                     f"Accuracy {cell(metrics['Accuracy']).strip()}")
    if head["Accuracy"] is None:
        lines.append(NO_LABELLED_PIXEL)
    return "\n".join(lines)


def format_linear(metrics):
    """One line with the linear probe's headline numbers (a supervised diagnostic)."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    return (f"linear probe (supervised, no CRF): mIoU {cell(metrics['mIoU'])}   "
            f"Accuracy {cell(metrics['Accuracy'])}")


def side_name(source, n, taken):
    """``<source stem>_side.png`` (``<n>_<stem>_side.png`` when two sources share a stem)."""
    stem = Path(str(source)).stem or str(n)
    name = f"{stem}_side.png" if f"{stem}_side.png" not in taken else f"{n}_{stem}_side.png"
    taken.add(name)
    return name


def save_side(image, label, pred_classes, palette, class_names, path):
    """The side-by-side of one evaluated image: image | overlay | prediction | ground truth, with
    a legend of the classes present in either (ignored pixels black, unlisted)."""
    present = np.unique(np.concatenate([pred_classes.ravel(), np.asarray(label).ravel()]))
    present = [int(c) for c in present if 0 <= c < len(class_names)]
    legend = legend_image([class_names[c] for c in present], [palette[c] for c in present])
    return save_png(side_by_side(image, colorize(pred_classes, palette), legend,
                                 truth=colorize(label, palette)), path)


def save_examples(examples, to_class, palette, output_dir, class_names=None):
    """Write ``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png`` for each kept example, and, for
    examples that carry their source name (a fourth element), ``<source stem>_side.png``."""
    paths, taken = [], set()
    for n, (image, label, pred, *source) in enumerate(examples):
        pred_classes = to_class[pred].numpy()
        paths.append(save_png(image, Path(output_dir) / f"{n}_img.png"))
        paths.append(save_png(colorize(label, palette), Path(output_dir) / f"{n}_label.png"))
        paths.append(save_png(colorize(pred_classes, palette), Path(output_dir) / f"{n}_pred.png"))
        if source and class_names is not None:
            paths.append(save_side(image, label, pred_classes, palette, class_names,
                                   Path(output_dir) / side_name(source[0], n, taken)))
    return paths


# What an evaluation writes into its folder (the report pictures: smooseg.eval.report.REPORT_FILES)
EXAMPLE_PICTURE = re.compile(r"\d+_(img|label|pred)\.png|.+_side\.png")
REPORT_PICTURES = ("per_class_iou.png", "confusion.png", "examples.png")


def clear_outputs(output_dir):
    """Remove what an earlier evaluation left in ``output_dir``: ``metrics.json``, the example
    pictures (``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png``, ``*_side.png``) and the report
    pictures, so that nothing stale (another checkpoint's, or more examples than this run keeps)
    survives into the new evaluation's folder or report. Other files are left alone; returns the removed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for path in sorted(output_dir.iterdir()):
        if path.is_file() and (path.name == "metrics.json" or path.name in REPORT_PICTURES
                               or EXAMPLE_PICTURE.fullmatch(path.name)):
            path.unlink()
            removed.append(path)
    return removed


def write_outputs(metrics, examples, data, n_clusters, output_dir):
    """Write ``metrics.json`` and the example pictures of one evaluation into ``output_dir``.

    ``examples`` are (H×W×3 uint8 image, label, cluster prediction) triples; the prediction is
    coloured through the Hungarian cluster -> class map of the headline metrics. What an earlier
    evaluation wrote there is removed first (:func:`clear_outputs`) and ``metrics.json`` is
    written last, so the folder holds this evaluation only and is complete once it has
    ``metrics.json``.
    """
    output_dir = Path(output_dir)
    assignment = [metrics["assignment"][name] for name in data.class_names]
    to_class = cluster_to_class_map(assignment, n_clusters)
    clear_outputs(output_dir)
    save_examples(examples, to_class, colormap(data.name, data.n_classes), output_dir, list(data.class_names))
    return write_json(metrics, output_dir / "metrics.json")


def print_summary(metrics, class_names):
    """The per-class table (with the CRF column when the CRF ran) and the linear probe's line."""
    crf = metrics.get("nocrf") is not None
    print(format_table(metrics["nocrf"] if crf else metrics, class_names, metrics if crf else None))
    if metrics.get("linear") is not None:
        print(format_linear(metrics["linear"]))


HEADLINE = ("mIoU", "Accuracy")
STD_NOTE = "sample standard deviation (ddof=1); null with fewer than two values"


def spread(values):
    """``{n, mean, std, min, max}`` of the non-null ``values``; ``std`` is the sample standard
    deviation (ddof=1), null with fewer than two values; all null with none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def shared_provenance(runs):
    """The provenance all ``runs`` share: the first recorded one without its per-checkpoint part
    and image count (each run keeps its own), or None when no run records one."""
    recorded = [run["provenance"] for run in runs if run.get("provenance") is not None]
    if not recorded:
        return None
    shared = {key: value for key, value in recorded[0].items() if key != "checkpoint"}
    shared["evaluation"] = {key: value for key, value in shared["evaluation"].items() if key != "n_images"}
    return shared


def summarize_runs(runs):
    """The summary over several evaluations (checkpoints, or the jobs of a sweep over seeds).

    ``runs`` are dicts holding at least the headline ``mIoU`` and ``Accuracy``, and a
    ``provenance`` where recorded; runs evaluated with different settings are refused
    (:func:`smooseg.eval.provenance.check_same_settings`). The result keeps them under ``runs``
    and adds the :func:`spread` of each headline number and the provenance they share.
    """
    runs = list(runs)
    check_same_settings(runs)
    spreads = {key: spread(run.get(key) for run in runs) for key in HEADLINE}
    return {"n": len(runs), "std": STD_NOTE, **spreads,
            "provenance": shared_provenance(runs), "runs": runs}


def format_runs(summary, label):
    """The printed summary: one headline line per run (named by its ``label`` key: ``checkpoint``,
    ``job``, and its ``seed`` when it has one), then mean ± std (min, max) of mIoU and Accuracy."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    names = [str(run.get(label)) + (f" (seed {run['seed']})" if run.get("seed") is not None else "")
             for run in summary["runs"]]
    width = max([len(n) for n in names] + [len("Accuracy")])
    lines = [f"== summary over {summary['n']} {label}s (mean ± sample std, ddof=1)"]
    lines += [f"{name:<{width}}  mIoU {cell(run.get('mIoU')):>6}   Accuracy {cell(run.get('Accuracy')):>6}"
              for name, run in zip(names, summary["runs"], strict=True)]
    for key in HEADLINE:
        s = summary[key]
        std = "" if s["std"] is None else f" ± {cell(s['std'])}"  # one value has no spread
        lines.append(f"{key:<{width}}  {cell(s['mean'])}{std}   "
                     f"(min {cell(s['min'])}, max {cell(s['max'])}, n={s['n']})")
    return "\n".join(lines)


def write_summary(runs, path, label):
    """Print the summary of ``runs`` and write it as JSON at ``path``; returns the summary."""
    summary = summarize_runs(runs)
    print(format_runs(summary, label))
    print(f"summary: {write_json(summary, path)}")
    return summary


@contextlib.contextmanager
def claim_results_dir(output_dir):
    """Hold ``<output_dir>/.eval.lock`` (``flock``) for the block; SmoosegError when another
    evaluation holds it. A block that fails before writing any result leaves nothing behind: the
    lock and the folders made for it are removed."""
    folder = Path(output_dir)
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".eval.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SmoosegError(f"output_dir {folder} is being written by another evaluation (it holds {lock}); "
                           "wait for it to finish or pass another output_dir") from None
    try:
        yield folder
    except BaseException:
        if all(entry.name == lock.name for entry in folder.iterdir()):
            lock.unlink(missing_ok=True)
            for path in created:  # deepest first
                path.rmdir()
        raise
    finally:
        os.close(fd)
