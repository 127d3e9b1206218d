"""What an evaluation leaves behind: the JSON-ready metrics, the printed per-class table and
the example pictures (``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png``)."""

import math
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


def write_outputs(metrics, examples, data, n_clusters, output_dir):
    """Write ``metrics.json`` and the example pictures of one evaluation into ``output_dir``.

    ``examples`` are (H×W×3 uint8 image, label, cluster prediction) triples; the prediction is
    coloured through the Hungarian cluster -> class map of the headline metrics.
    """
    output_dir = Path(output_dir)
    assignment = [metrics["assignment"][name] for name in data.class_names]
    to_class = cluster_to_class_map(assignment, n_clusters)
    save_examples(examples, to_class, colormap(data.name, data.n_classes), output_dir)
    return write_json(metrics, output_dir / "metrics.json")


def print_summary(metrics, class_names):
    """The per-class table (with the CRF column when the CRF ran) and the linear probe's line."""
    crf = metrics.get("nocrf") is not None
    print(format_table(metrics["nocrf"] if crf else metrics, class_names, metrics if crf else None))
    if metrics.get("linear") is not None:
        print(format_linear(metrics["linear"]))
