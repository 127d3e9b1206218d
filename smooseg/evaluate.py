"""Evaluation loop (SPEC §5–§6): flip averaging, optional dense CRF, Hungarian metrics, pictures.

``evaluate`` runs one module over one loader; ``run_eval(cfg)`` (what ``eval_segmentation.py``
runs, config ``configs/eval.yaml``) evaluates each checkpoint of ``model_paths`` with one CRF pool.

Output of one checkpoint, in ``<output_dir>/<checkpoint stem>/``:
  * ``metrics.json``: the headline ``mIoU`` / ``Accuracy`` (after the CRF when it is on),
    ``per_class_iou``, ``assignment`` (class name -> matched cluster) and ``confusion`` (K×n pixel
    counts, rows clusters, columns classes), and, when the CRF is on,
    the same numbers without it under ``nocrf``. Undefined IoUs (class absent, never predicted)
    are ``null``. A checkpoint trained with ``linear_probe=true`` adds ``linear``: the same
    numbers for the supervised linear probe (identity class map, same flip-averaged code, no CRF).
  * ``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png`` for the first ``n_images`` images,
    label and prediction coloured with the data set's colour map (prediction through the
    Hungarian cluster -> class map).
"""

import contextlib
import json
import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from smooseg.checkpoints import load_module
from smooseg.crf import CRFPool, available_cores, to_uint8_image
from smooseg.data.datasets import build_dataset
from smooseg.data.transforms import unnormalize
from smooseg.errors import SmoosegError, atomic_write
from smooseg.metrics import ClusterMetrics, cluster_to_class_map
from smooseg.viz import colorize, colormap, save_png

AUTOCAST_DTYPES = {"32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
                   "16": torch.float16, "16-mixed": torch.float16}


def resolve_device(device):
    """``auto`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise SmoosegError(f"device={device} is not a torch device ({err}); use auto, cpu or cuda") from None


def autocast_context(device, precision):
    """Autocast for ``precision`` (32 | bf16 | 16, Lightning-style suffixes accepted)."""
    key = str(precision)
    if key not in AUTOCAST_DTYPES:
        raise SmoosegError(f"precision={precision} is unknown; use 32, bf16-mixed or 16-mixed")
    dtype = AUTOCAST_DTYPES[key]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def save_examples(examples, to_class, palette, output_dir):
    """Write ``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png`` for each kept example."""
    paths = []
    for n, (image, label, pred) in enumerate(examples):
        paths.append(save_png(image, Path(output_dir) / f"{n}_img.png"))
        paths.append(save_png(colorize(label, palette), Path(output_dir) / f"{n}_label.png"))
        paths.append(save_png(colorize(to_class[pred].numpy(), palette), Path(output_dir) / f"{n}_pred.png"))
    return paths


def write_json(data, path):
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


class _Collector:
    """Accumulates predictions into a ClusterMetrics and keeps the first ``n_images`` pictures."""

    def __init__(self, n_classes, n_clusters, mask_extra_clusters, n_images, device):
        self.metric = ClusterMetrics(n_classes, n_clusters, mask_extra_clusters).to(device)
        self.n_images = n_images
        self.preds = []

    def add(self, preds, labels):
        self.metric.update(preds, labels)
        room = self.n_images - len(self.preds)
        self.preds.extend(p for p in preds[:room].cpu())


@contextlib.contextmanager
def cpu_threads_beside(crf_pool):
    """Yields ``share()``, which gives torch the cores the CRF workers leave free at that moment.

    Call it before each network pass: with no CRF job running (the first batch, or a drained
    pool) the network gets every core it had; while k workers are busy it gets the others (at
    least one). OpenMP threads that outnumber the free cores stall at every barrier while the
    CRF workers hold the cores. The previous thread count is restored afterwards.
    """
    before = torch.get_num_threads()
    cores = available_cores()

    def share():
        busy = crf_pool.busy_workers() if crf_pool is not None else 0
        threads = max(1, min(before, cores - busy))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    try:
        yield share
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def evaluate(module, dataloader, crf_pool=None, flip=True, n_images=0, output_dir=None,
             device="cpu", precision="32", checkpoint=None, show_progress=True):
    """Evaluate ``module`` on ``dataloader``; returns the metrics dict that ``metrics.json`` holds.

    The CRF is pipelined: batch n's CRF jobs run in ``crf_pool`` while batch n+1 goes through the
    network (the pool bounds the batches in flight). With ``output_dir`` the JSON and the first
    ``n_images`` pictures are written there and the per-class table is printed.
    """
    device = resolve_device(device)
    module = module.to(device).eval()
    hp = module.hparams
    names = list(module.class_names)
    args = (hp.n_classes, module.n_clusters, hp.mask_extra_clusters, int(n_images))
    plain = _Collector(*args, device)
    refined = _Collector(*args, "cpu") if crf_pool is not None else None
    linear = (ClusterMetrics(hp.n_classes, hp.n_classes, match="identity").to(device)
              if module.linear_probe is not None else None)
    images, labels, pending = [], [], deque()

    def finish(handle, batch_labels):
        refined.add(torch.from_numpy(np.stack(handle.result()).astype(np.int64)), batch_labels)

    with cpu_threads_beside(crf_pool) as share_cores:
        for batch in tqdm(dataloader, desc="eval", disable=not show_progress):
            share_cores()
            img, label = batch["img"].to(device), batch["label"].to(device)
            with autocast_context(device, precision):
                code = module.predict_code(img, flip)
                log_probs = module.code_log_probs(code, label.shape[-2:]).float()
                if linear is not None:
                    linear.update(module.linear_log_probs(code, label.shape[-2:]).argmax(1), label)
            plain.add(log_probs.argmax(1), label)
            rgb = None
            if crf_pool is not None or len(images) < n_images:
                rgb = [to_uint8_image(x) for x in unnormalize(img.float()).cpu()]
                room = n_images - len(images)
                images.extend(rgb[:room])
                labels.extend(x.numpy() for x in label[:room].cpu())
            if crf_pool is not None:
                pending.append((crf_pool.submit(rgb, log_probs.cpu(), labels=True), label.cpu()))
                while pending and pending[0][0].done():
                    finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())

    result = {"checkpoint": None if checkpoint is None else str(checkpoint),
              "dataset": hp.dataset_name, "n_evaluated": len(dataloader.dataset),
              "flip": bool(flip), "crf": crf_pool is not None}
    nocrf = summarize(plain.metric.compute(), names)
    head_collector = refined if refined is not None else plain
    head_raw = head_collector.metric.compute()
    head = summarize(head_raw, names)
    result.update(head)
    if refined is not None:
        result["nocrf"] = nocrf
    if linear is not None:
        result["linear"] = summarize(linear.compute(), names)
    if output_dir is not None:
        output_dir = Path(output_dir)
        to_class = cluster_to_class_map(head_raw["assignment"], module.n_clusters)
        palette = colormap(hp.dataset_name, hp.n_classes)
        examples = list(zip(images, labels, head_collector.preds))
        save_examples(examples, to_class, palette, output_dir)
        write_json(result, output_dir / "metrics.json")
        print(format_table(nocrf, names, head if refined is not None else None))
        if linear is not None:
            print(format_linear(result["linear"]))
    return result


def format_linear(metrics):
    """One line with the linear probe's headline numbers (a supervised diagnostic)."""
    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    return (f"linear probe (supervised, no CRF): mIoU {cell(metrics['mIoU'])}   "
            f"Accuracy {cell(metrics['Accuracy'])}")


def eval_dataset(cfg, module):
    """The evaluation set: the checkpoint's data set (or the ``dataset`` group chosen) at ``eval_res``.

    Centre crops; ``eval_res`` / ``image_interp`` default to what the checkpoint was validated with.
    """
    hp = module.hparams
    if cfg.get("dataset") is not None:
        name, dir_name = cfg.dataset.name, cfg.dataset.get("dir_name")
    else:
        name, dir_name = hp.dataset_name, hp.get("dir_name")
    res = cfg.eval_res or hp.get("eval_res") or (224 if name == "potsdam" else 320)
    dataset = build_dataset(name, cfg.data_dir, cfg.split, int(res), crop="center",
                            image_interp=cfg.image_interp or hp.get("image_interp", "nearest"),
                            n_classes=hp.n_classes if name == "directory" else None,
                            dir_name=dir_name)
    if dataset.n_classes != hp.n_classes:
        raise SmoosegError(f"dataset={name} has {dataset.n_classes} classes but the checkpoint was "
                           f"trained for {hp.n_classes}; evaluate on a data set with the same classes")
    return dataset


def output_names(paths):
    """A distinct output folder name per checkpoint: its stem, suffixed with _2, _3 on clashes."""
    names, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def run_eval(cfg):
    """Evaluate every checkpoint of ``cfg.model_paths``; returns a list of metrics dicts."""
    paths = list(cfg.model_paths) if OmegaConf.is_list(cfg.model_paths) or isinstance(
        cfg.model_paths, (list, tuple)) else [cfg.model_paths]
    if not paths:
        raise SmoosegError("model_paths is empty; pass model_paths=[path/to/a.ckpt,...]")
    device = resolve_device(cfg.device)
    pool = CRFPool(num_workers=cfg.crf_workers, timeout=float(cfg.crf_timeout)) if cfg.crf else None
    results = []
    try:
        for path, name in zip(paths, output_names(paths)):
            module = load_module(path, map_location=device)
            loader = DataLoader(eval_dataset(cfg, module), batch_size=int(cfg.batch_size),
                                shuffle=False, drop_last=False, num_workers=int(cfg.num_workers))
            out = Path(cfg.output_dir) / name
            print(f"== {path}")
            results.append(evaluate(module, loader, crf_pool=pool, flip=bool(cfg.flip),
                                    n_images=int(cfg.n_images), output_dir=out, device=device,
                                    precision=cfg.precision, checkpoint=path))
            print(f"results: {out / 'metrics.json'}")
            if cfg.get("report"):
                from smooseg.report import write_report

                for part, picture in write_report(out / "metrics.json").items():
                    print(f"report {part}: {picture}")
    finally:
        if pool is not None:
            pool.close()
    return results
