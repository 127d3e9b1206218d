"""Evaluation (docs/method.md sections 5-6): flip averaging, optional dense CRF, Hungarian metrics.

``evaluate`` runs one net over one loader and returns its metrics and example pictures;
``run_eval(settings)`` (what ``eval_segmentation.py`` runs, :class:`smooseg.settings.EvalSettings`)
evaluates each checkpoint of ``model_paths`` (or nets handed to it) with one CRF pool and writes,
per checkpoint, in ``<output_dir>/<checkpoint stem>-<sha256[:10]>/`` (see :mod:`smooseg.eval.results`):

  * ``metrics.json``: the headline ``mIoU`` / ``Accuracy`` (after the CRF when it is on),
    ``per_class_iou``, ``assignment`` (class name -> matched cluster) and ``confusion`` (K×n pixel
    counts, rows clusters, columns classes), and, when the CRF is on,
    the same numbers without it under ``nocrf``. Undefined IoUs (class absent, never predicted)
    are ``null``. A checkpoint trained with ``linear_probe=true`` adds ``linear``: the same
    numbers for the supervised linear probe (identity class map, same flip-averaged code, no CRF).
  * ``<n>_img.png``, ``<n>_label.png``, ``<n>_pred.png`` for the first ``n_images`` images,
    label and prediction coloured with the data set's colour map (prediction through the
    Hungarian cluster -> class map), and ``<source name>_side.png`` (image | overlay | prediction
    | ground truth, legend of the classes present).

and, over the checkpoints of ``model_paths`` (glob patterns expanded), ``<output_dir>/summary.json``:
each checkpoint's headline and the mean, sample standard deviation (ddof=1), min and max of
mIoU and Accuracy. Training's final evaluation (``final_eval``) runs through ``evaluate_jobs`` too.

Before any work: ``output_dir`` must be a folder that can be written (or created), every
checkpoint path an existing, readable file, and a ``dataset`` chosen on the command line must
agree with the checkpoint (its ``n_classes``, and for named sets the set itself). Each
``<output_dir>/<name>/`` holds one evaluation: what an earlier one wrote there (metrics.json,
``<n>_*.png``, report pictures) is removed before the new one is written.
"""

import contextlib
import glob
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from smooseg.data.datasets import DatasetInfo, build_dataset
from smooseg.data.registry import dataset_spec, find_spec
from smooseg.data.transforms import to_uint8_image, unnormalize
from smooseg.errors import SmoosegError
from smooseg.eval import provenance
from smooseg.eval.crf_backend import open_crf
from smooseg.eval.crf_memory import pool_backend
from smooseg.eval.crf_pool import available_cores
from smooseg.eval.metrics import ClusterMetrics
from smooseg.eval.provenance import file_sha256
from smooseg.eval.results import claim_results_dir, print_summary, summarize, write_outputs, write_summary
from smooseg.io import check_input_file, check_output_dir
from smooseg.model.checkpoints import load_net
from smooseg.progress import progress_bar
from smooseg.runtime import autocast, resolve_device


class _Collector:
    """Accumulates predictions into a ClusterMetrics and keeps the first ``n_images`` pictures.

    An evaluation runs in one process: the counts are never synchronised, also when it runs inside
    a distributed training's rank zero (the final evaluation) after the other ranks have left.
    """

    def __init__(self, n_classes, n_clusters, mask_extra_clusters, n_images, device):
        self.metric = ClusterMetrics(n_classes, n_clusters, mask_extra_clusters,
                                     sync_on_compute=False).to(device)
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
def evaluate(net, dataloader, data: DatasetInfo, mask_extra_clusters=False, crf_pool=None, flip=True,
             n_images=0, device="cpu", precision="32", checkpoint=None, show_progress=True):
    """Evaluate ``net`` on ``dataloader``; returns ``(metrics, examples)``: the dict that
    ``metrics.json`` holds and the first ``n_images`` (image, label, cluster prediction) triples
    (with the item's source name as a fourth element when the data set names its items).

    ``precision`` is the autocast of the whole pass, the frozen backbone included. ``crf_pool``
    is a CRF runner (:func:`smooseg.eval.crf_backend.open_crf`); with the pydensecrf pool the CRF
    is pipelined: batch n's CRF jobs run in the pool while batch n+1 goes through the network
    (the pool bounds the batches in flight); the torch CRF runs each batch on the device at once.
    """
    device = resolve_device(device)
    net = net.to(device).eval()
    net.backbone_precision = str(precision)
    names = list(data.class_names)
    args = (data.n_classes, net.n_clusters, mask_extra_clusters, int(n_images))
    plain = _Collector(*args, device)
    refined = _Collector(*args, "cpu") if crf_pool is not None else None
    linear = (ClusterMetrics(data.n_classes, data.n_classes, match="identity",
                             sync_on_compute=False).to(device)
              if net.linear_probe is not None else None)
    images, labels, sources, pending = [], [], [], deque()

    def finish(handle, batch_labels):
        refined.add(torch.from_numpy(np.stack(handle.result()).astype(np.int64)), batch_labels)

    with cpu_threads_beside(crf_pool) as share_cores:
        for batch in progress_bar(dataloader, desc="eval", disable=not show_progress):
            share_cores()
            img, label = batch["img"].to(device), batch["label"].to(device)
            with autocast(device, precision):
                code = net.predict_code(img, flip)
                log_probs = net.cluster_log_probs(code, label.shape[-2:]).float()
                if linear is not None:
                    linear.update(net.linear_log_probs(code, label.shape[-2:]).argmax(1), label)
            plain.add(log_probs.argmax(1), label)
            rgb = None
            if crf_pool is not None or len(images) < n_images:
                rgb = [to_uint8_image(x) for x in unnormalize(img.float()).cpu()]
                room = n_images - len(images)
                images.extend(rgb[:room])
                labels.extend(x.numpy() for x in label[:room].cpu())
                sources.extend(list(batch.get("name") or [])[:room])
            if crf_pool is not None:
                pending.append((crf_pool.submit(rgb, log_probs, labels=True), label.cpu()))
                while pending and pending[0][0].done():
                    finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())

    metrics = {"checkpoint": None if checkpoint is None else str(checkpoint),
               "dataset": data.name, "n_evaluated": len(dataloader.dataset),
               "flip": bool(flip), "crf": crf_pool is not None}
    head = refined if refined is not None else plain
    metrics.update(summarize(head.metric.compute(), names))
    if refined is not None:
        metrics["nocrf"] = summarize(plain.metric.compute(), names)
    if linear is not None:
        metrics["linear"] = summarize(linear.compute(), names)
    examples = list(zip(images, labels, head.preds, strict=True))
    if len(sources) == len(examples):  # (image, label, prediction, source name) when the set names its items
        examples = [(*example, str(name)) for example, name in zip(examples, sources, strict=True)]
    return metrics, examples


def eval_dataset(settings, data: DatasetInfo):
    """The evaluation set: the checkpoint's data set (or the ``dataset`` group chosen) at ``eval_res``.

    Centre crops; ``eval_res`` / ``image_interp`` default to what the checkpoint was validated with.
    """
    if settings.dataset is not None:
        name, dir_name = settings.dataset.name, settings.dataset.dir_name
        check_dataset_matches(settings.dataset, data)
    else:
        name, dir_name = data.name, data.dir_name
    res = settings.eval_res or data.eval_res or dataset_spec(name).eval_res
    dataset = build_dataset(name, settings.data_dir, settings.split, int(res), crop="center",
                            image_interp=settings.image_interp or data.image_interp,
                            n_classes=data.n_classes if dataset_spec(name).n_classes is None else None,
                            dir_name=dir_name)
    if dataset.n_classes != data.n_classes:
        raise SmoosegError(f"dataset={name} has {dataset.n_classes} classes but the checkpoint was "
                           f"trained for {data.n_classes}; evaluate on a data set with the same classes")
    if not dataset.labelled:
        raise SmoosegError(f"dataset={name} has no labels in its {settings.split} split, so there is "
                           "nothing to score against; to see the clusters, segment the images with "
                           "segment_images.py model_path=<checkpoint> input_dir=<the images' folder>")
    return dataset


def check_dataset_matches(dataset, data: DatasetInfo):
    """Refuse a ``dataset`` group (the config chosen with ``dataset=...``) that contradicts the
    checkpoint's :class:`DatasetInfo` ``data``: a ``dataset.n_classes`` other than the
    checkpoint's class count, or another named data set (its classes are other classes; directory
    sets have no class names of their own, so only their count must agree)."""
    n_classes = dataset.n_classes
    if n_classes is not None and n_classes != data.n_classes:
        raise SmoosegError(f"dataset.n_classes={n_classes} contradicts the checkpoint, trained for "
                           f"{data.n_classes} classes ({data.name}); pass dataset.n_classes={data.n_classes} "
                           "or evaluate a checkpoint trained for these classes")
    name = dataset.name
    specs = (find_spec(name), find_spec(data.name))
    if specs[0] is not specs[1] and all(spec is not None and spec.n_classes for spec in specs):
        raise SmoosegError(f"dataset={name} contradicts the checkpoint, trained on {data.name} (other "
                           f"classes); pass dataset={data.name}, or leave dataset unset to use the "
                           "checkpoint's data set")


def output_names(paths):
    """A distinct output folder name per checkpoint: ``<stem>-<first 10 hex of its sha256>``, so
    that two different files (every run's ``last.ckpt``) never share a folder; a name repeated
    (two copies of one file) is suffixed with _2, _3."""
    names, seen = [], {}
    for path in paths:
        stem = f"{Path(path).stem}-{file_sha256(path)[:10]}"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def checkpoint_paths(model_paths):
    """The checkpoint files ``model_paths`` names: one path or a list, each entry a path or a glob
    pattern (``*``, ``?``, ``[...]``, ``**``) expanded in sorted order; a file named twice counts once.

    An entry that exists as written is that file, never a pattern (``run[1]/last.ckpt``). A
    pattern that matches nothing is an error, so a mistyped pattern is not an empty evaluation.
    """
    entries = list(model_paths) if OmegaConf.is_list(model_paths) or isinstance(
        model_paths, (list, tuple)) else [model_paths]
    if not entries:
        raise SmoosegError("model_paths is empty; pass model_paths=[path/to/a.ckpt,...]")
    paths = []
    for entry in map(str, entries):
        if any(char in entry for char in "*?[") and not os.path.exists(os.path.expanduser(entry)):
            matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
            if not matches:
                raise SmoosegError(f"model_paths pattern '{entry}' matches no file; check the pattern "
                                   "(e.g. model_paths='runs/*/checkpoints/best-*.ckpt', quoted)")
            paths.extend(matches)
        else:
            paths.append(os.path.expanduser(entry))
    return list(dict.fromkeys(paths))


def check_checkpoints(paths):
    """Check every checkpoint path (exists, is a file, can be read) before the first is
    evaluated, so a typo in the last of several is not found an evaluation later."""
    for i, path in enumerate(paths):
        joined = None if Path(path).exists() else next(
            (",".join(paths[i:j]) for j in range(i + 2, len(paths) + 1)
             if Path(",".join(paths[i:j])).is_file()), None)
        if joined is not None:
            raise SmoosegError(f"checkpoint {path} not found, but {joined} is a file: the ',' in its "
                               f"name split it into two entries of the list; quote it: "
                               f"'model_paths=[\"{joined}\"]'")
        if "{" in path and "}" in path and not Path(path).exists():
            raise SmoosegError(f"checkpoint {path} not found; braces are not expanded in model_paths: "
                               "list the files (model_paths=[a.ckpt,b.ckpt]) or use a glob pattern")
        check_input_file(path, "model_paths", missing="not found", label=f"checkpoint {path}",
                         fix="pass the path of a .ckpt file (a path with '=' quoted: "
                             "'model_paths=[\"a=b.ckpt\"]'), or a glob pattern that matches files, "
                             "e.g. model_paths='runs/*/checkpoints/best-*.ckpt'")


class EvalJob(NamedTuple):
    """One evaluation: its output folder name, the checkpoint path (None for a net handed over)
    and ``load(device) -> (net, hparams)``."""

    name: str
    path: str | None
    load: Callable


def checkpoint_jobs(paths, names=None):
    """An :class:`EvalJob` per checkpoint path (named by :func:`output_names` unless ``names``
    are given); each net is loaded only when its turn comes."""
    names = output_names(paths) if names is None else list(names)
    return [EvalJob(name, str(path), lambda device, path=path: load_net(path, map_location=device))
            for path, name in zip(paths, names, strict=True)]


def evaluate_jobs(settings, jobs):
    """Evaluate each :class:`EvalJob` with ``settings`` (resolved :class:`smooseg.settings.EvalSettings`)
    and one CRF runner; returns ``(metrics, metrics.json path)`` per job.

    For each: the per-class table is printed, ``metrics.json`` and the pictures are written to
    ``<output_dir>/<name>/`` and, with ``report``, the report pictures next to them.
    """
    check_output_dir(settings.output_dir, "output_dir")
    device = torch.device(settings.device)
    pool = (open_crf(settings.crf_backend, device, settings.crf_workers, settings.crf_timeout)
            if settings.crf else None)
    results = []
    try:
        for name, path, load in jobs:
            net, hparams = load(device)
            data = DatasetInfo(**hparams["data"])
            loader = DataLoader(eval_dataset(settings, data), batch_size=settings.batch_size,
                                shuffle=False, drop_last=False, num_workers=settings.num_workers)
            out = Path(settings.output_dir) / name
            print(f"== {path or name}")
            metrics, examples = evaluate(
                net, loader, data, mask_extra_clusters=bool(hparams["metrics"]["mask_extra_clusters"]),
                crf_pool=pool, flip=settings.flip, n_images=settings.n_images, device=device,
                precision=settings.precision, checkpoint=path)
            metrics["provenance"] = provenance.record(provenance.eval_record(
                settings, loader.dataset, data.name, pool and pool_backend(pool), settings.precision),
                provenance.checkpoint_record(path, hparams), device)
            print_summary(metrics, data.class_names)
            written = write_outputs(metrics, examples, data, net.n_clusters, out)
            print(f"results: {written}")
            results.append((metrics, written))
            if settings.report:
                from smooseg.eval.report import write_report

                for part, picture in write_report(written).items():
                    print(f"report {part}: {picture}")
    finally:
        if pool is not None:
            pool.close()
    return results


def run_eval(settings, models=None):
    """Evaluate every checkpoint of ``settings.model_paths`` (globs expanded), or the ``models`` given
    as ``(name, net, hparams)`` triples; returns a list of metrics dicts.

    Each is evaluated by :func:`evaluate_jobs`. For ``model_paths`` the summary over the
    checkpoints follows (each headline, mean ± sample standard deviation, min and max of mIoU
    and Accuracy), printed and written to ``<output_dir>/summary.json``.
    """
    check_output_dir(settings.output_dir, "output_dir")
    if models is None:
        paths = checkpoint_paths(settings.model_paths)
        check_checkpoints(paths)
        jobs = checkpoint_jobs(paths)
    else:
        jobs = [EvalJob(name, None, lambda device, net=net, hp=hp: (net, hp)) for name, net, hp in models]
    with claim_results_dir(settings.output_dir):
        results = evaluate_jobs(settings, jobs)
        if models is None:
            write_summary([run_headline(metrics, written) for metrics, written in results],
                          Path(settings.output_dir) / "summary.json", label="checkpoint")
    return [metrics for metrics, _ in results]


def run_headline(metrics, written):
    """The summary entry of one evaluation: checkpoint, its metrics.json, CRF or not, mIoU, Accuracy."""
    return {"checkpoint": metrics["checkpoint"], "metrics": str(written), "crf": metrics["crf"],
            "mIoU": metrics["mIoU"], "Accuracy": metrics["Accuracy"], "provenance": metrics.get("provenance")}
