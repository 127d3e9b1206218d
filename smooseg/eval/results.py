"""What an evaluation leaves behind: the JSON-ready metrics, the printed per-class table,
the example pictures (``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png``) and the summary over
several evaluations (mean ± sample std, min, max of mIoU and Accuracy: ``summary.json``)."""

import math
import re
import statistics
from pathlib import Path

from smooseg.eval.metrics import cluster_to_class_map
from smooseg.io import write_json
from smooseg.viz import colorize, colormap, save_png


def _clean(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize(result, class_names):
    """JSON-ready metrics: mIoU, Accuracy, per-class IoU, class -> cluster assignment, confusion (K×n)."""
    return {
        "mIoU": _clean(float(result["mIoU"])),
        "Accuracy": _clean(float(result["Accuracy"])),
        "per_class_iou": {name: _clean(float(v)) for name, v in zip(class_names, result["iou"].tolist())},
        "assignment": {name: int(k) for name, k in zip(class_names, result["assignment"].tolist())},
        "confusion": result["confusion"].tolist(),
    }


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
    return "\n".join(lines)


def format_linear(metrics):
    """One line with the linear probe's headline numbers (a supervised diagnostic)."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    return (f"linear probe (supervised, no CRF): mIoU {cell(metrics['mIoU'])}   "
            f"Accuracy {cell(metrics['Accuracy'])}")


def save_examples(examples, to_class, palette, output_dir):
    """Write ``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png`` for each kept example."""
    paths = []
    for n, (image, label, pred) in enumerate(examples):
        paths.append(save_png(image, Path(output_dir) / f"{n}_img.png"))
        paths.append(save_png(colorize(label, palette), Path(output_dir) / f"{n}_label.png"))
        paths.append(save_png(colorize(to_class[pred].numpy(), palette), Path(output_dir) / f"{n}_pred.png"))
    return paths


# What an evaluation writes into its folder (the report pictures: smooseg.eval.report.REPORT_FILES)
EXAMPLE_PICTURE = re.compile(r"\d+_(img|label|pred)\.png")
REPORT_PICTURES = ("per_class_iou.png", "confusion.png", "examples.png")


def clear_outputs(output_dir):
    """Remove what an earlier evaluation left in ``output_dir``: ``metrics.json``, the example
    pictures (``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png``) and the report pictures, so
    that nothing stale (another checkpoint's, or more examples than this run keeps) survives
    into the new evaluation's folder or report. Other files are left alone; returns the removed."""
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
    save_examples(examples, to_class, colormap(data.name, data.n_classes), output_dir)
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


def summarize_runs(runs):
    """The summary over several evaluations (checkpoints, or the jobs of a sweep over seeds).

    ``runs`` are dicts holding at least the headline ``mIoU`` and ``Accuracy``; the result keeps
    them under ``runs`` and adds the :func:`spread` of each headline number.
    """
    runs = list(runs)
    return {"n": len(runs), "std": STD_NOTE, **{key: spread(run.get(key) for run in runs) for key in HEADLINE},
            "runs": runs}


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
              for name, run in zip(names, summary["runs"])]
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
