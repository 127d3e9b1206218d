"""Segment a folder of your own images with a trained SmooSeg model (``segment_images.py``).

For each image, at its original size (after EXIF orientation), named after the source file:
``<stem>_mask.png`` (colour mask), ``<stem>_overlay.png`` (the mask blended over the image),
``<stem>_side.png`` (image | overlay | mask with a legend of the colours present,
:mod:`smooseg.eval.pictures`) and, with ``save_ids``, ``<stem>_ids.png`` (the raw cluster ids as a
palette PNG, format in :mod:`smooseg.eval.pictures`). ``legend.png`` in the output folder lists
every colour that occurs in any written mask. With ``recursive`` the input's subfolders are
mirrored in the output; symlinked subfolders are not followed (each one skipped is named in a
warning) and an output folder inside the input is never read as input. Two images with the same
stem in one folder (``a.jpg``, ``a.png``) are told apart by their extension (``a_jpg_mask.png``).

How an image is fitted to the patch size: :mod:`smooseg.eval.predict`; the CRF's memory bound:
:mod:`smooseg.eval.crf_memory`.

Colours: without a class map cluster k takes palette colour k and is named ``cluster k``. With a
cluster -> class map (from the ``metrics.json`` of an evaluation of the same checkpoint, checked
by its recorded sha256) a matched cluster takes its class colour and name, and each unmatched
(extra) cluster one of the palette colours after the classes.
"""

import logging
import os
from collections import deque
from pathlib import Path

import numpy as np
import torch

from smooseg.data.datasets import DatasetInfo
from smooseg.errors import SmoosegError
from smooseg.eval.crf_backend import open_crf
from smooseg.eval.crf_memory import (
    CRF_MAX_PIXELS,
    check_crf_memory,
    check_max_pixels,
    crf_image,
    crf_limit,
    crf_shape,
    parse_bytes,
    pool_backend,
    pool_concurrency,
    refined_ids,
)
from smooseg.eval.metrics import cluster_to_class_map
from smooseg.eval.pictures import cluster_names, present_legend, save_ids_png, side_by_side
from smooseg.eval.predict import PredictOptions, predict_image
from smooseg.eval.provenance import file_sha256
from smooseg.io import IMAGE_EXTENSIONS, check_input_file, check_output_dir, image_size, read_rgb
from smooseg.model.checkpoints import load_net
from smooseg.progress import progress_bar
from smooseg.runtime import resolve_device
from smooseg.viz import class_colors, colormap, legend_image, overlay, read_metrics_json, save_png

log = logging.getLogger(__name__)

HINTS = ("fix or remove it, or set skip_bad=true to skip unreadable images")


def _is_image(path, root):
    rel = path.relative_to(root)
    return not any(part.startswith(".") for part in rel.parts) and path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(root, exclude):
    """Files under ``root``, not following symlinked folders (each named in a warning) and not
    entering ``exclude``."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        folder = Path(folder)
        for name in sorted(dirs):
            sub = folder / name
            if sub.is_symlink() and not name.startswith("."):
                log.warning("skipped symlinked folder %s (recursive=true does not follow links; pass "
                            "its target as input_dir to segment it)", sub)
        dirs[:] = [d for d in dirs if not (folder / d).is_symlink()
                   and (exclude is None or not (folder / d).resolve().is_relative_to(exclude))]
        yield from (folder / name for name in files)


def list_images(input_dir, recursive=False, exclude=None):
    """Sorted image files of ``input_dir`` (subfolders too when ``recursive``), skipping hidden
    files and anything under ``exclude`` (the output folder when it lies inside the input)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise SmoosegError(f"input_dir {root} is not a folder; pass input_dir=<folder of images>")
    exclude = None if exclude is None else Path(exclude).resolve()
    candidates = _walk(root, exclude) if recursive else root.iterdir()
    found = [path for path in candidates if _is_image(path, root) and path.is_file()
             and (exclude is None or not path.resolve().is_relative_to(exclude))]
    if not found:
        hint = (" or set recursive=true to look in its subfolders"
                if not recursive and any(p.is_dir() for p in root.iterdir()) else "")
        raise SmoosegError(f"input_dir {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                           f"point it at a folder of images{hint}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def output_stems(paths, input_dir):
    """Output base path (relative, no suffix) per image; stems shared in a folder get the extension."""
    rels = [Path(p).relative_to(input_dir) for p in paths]
    keys = [(r.parent, r.stem) for r in rels]
    clash = {k for k in keys if keys.count(k) > 1}
    return [r.parent / (f"{r.stem}_{r.suffix[1:].lower()}" if k in clash else r.stem)
            for r, k in zip(rels, keys, strict=True)]


def read_image(path):
    """H×W×3 uint8 RGB of an image file (EXIF orientation applied); SmoosegError naming the file."""
    return np.array(read_rgb(path, exif=True, fix=HINTS))


def class_map_from_metrics(path, n_clusters, n_classes=None, checkpoint_sha256=None):
    """(cluster -> class LongTensor[K] with −1 for unmatched clusters, class names) of a metrics.json.

    With ``checkpoint_sha256`` the JSON must record that checkpoint (``provenance.checkpoint.sha256``):
    a matching belongs to the checkpoint it was computed for. A JSON without a recorded hash
    (written before it was recorded) is accepted with a warning.
    """
    metrics = read_metrics_json(path)
    assignment, names = metrics["assignment"], metrics["class_names"]
    fix = "pass the metrics.json of an evaluation of this checkpoint"
    if checkpoint_sha256 is not None:
        recorded = metrics["checkpoint_sha256"]
        if recorded is None:
            log.warning("metrics JSON %s records no checkpoint sha256: cannot check that it belongs to "
                        "this checkpoint", path)
        elif recorded != checkpoint_sha256:
            raise SmoosegError(f"metrics JSON {path} is the evaluation of another checkpoint (sha256 "
                               f"{recorded[:12]}…, this one {checkpoint_sha256[:12]}…); {fix}")
    if n_classes is not None and len(names) != n_classes:
        raise SmoosegError(f"metrics JSON {path} has {len(names)} classes but the model {n_classes}; {fix}")
    if assignment.max() >= n_clusters:
        raise SmoosegError(f"metrics JSON {path} assigns cluster {assignment.max()} but the model has "
                           f"{n_clusters} clusters; {fix}")
    return cluster_to_class_map(assignment, n_clusters), names


def cluster_palette(n_clusters, palette_name, class_map=None):
    """K×3 uint8 colours per cluster: palette order, or class colours through ``class_map``."""
    palette = colormap(palette_name, n_clusters)
    if class_map is None:
        return palette
    class_map = np.asarray(class_map, dtype=np.int64)
    if class_map.shape != (n_clusters,) or class_map.max(initial=-1) >= n_clusters:
        raise SmoosegError(f"class_map must give a class (or −1) for each of the {n_clusters} clusters, "
                           f"got shape {class_map.shape}; build it with cluster_to_class_map")
    return class_colors(class_map, palette)


class _Writer:
    """Writes the pictures of each segmented image and remembers which clusters occurred."""

    def __init__(self, output_dir, colors, names, alpha, save_ids):
        self.output_dir, self.colors, self.names = Path(output_dir), colors, names
        self.alpha, self.save_ids = alpha, save_ids
        self.results, self.seen = [], set()

    def write(self, image, ids, path, rel):
        stem = self.output_dir / rel
        mask = self.colors[ids]
        legend = present_legend(ids, self.colors, self.names)
        out = {"image": path, "ids": None,
               "mask": save_png(mask, stem.parent / f"{stem.name}_mask.png"),
               "overlay": save_png(overlay(image, mask, self.alpha),
                                   stem.parent / f"{stem.name}_overlay.png"),
               "side": save_png(side_by_side(image, mask, legend, self.alpha),
                                stem.parent / f"{stem.name}_side.png")}
        if self.save_ids:
            out["ids"] = save_ids_png(ids, self.colors, stem.parent / f"{stem.name}_ids.png")
        self.seen.update(np.unique(ids).tolist())
        self.results.append(out)

    def write_legend(self):
        """``legend.png``: every colour that occurs in a written mask."""
        if self.seen:
            present = sorted(self.seen)
            save_png(legend_image([self.names[k] for k in present], [self.colors[k] for k in present]),
                     self.output_dir / "legend.png")


def _image_sizes(paths, skip_bad):
    sizes = []
    for path in paths:
        try:
            sizes.append(image_size(path, exif=True, fix=HINTS))
        except SmoosegError:
            if not skip_bad:
                raise
            sizes.append(None)  # skipped, with its warning, when its turn comes
    return sizes


def _check_crf_fits(paths, skip_bad, n_clusters, pool, max_pixels, max_memory):
    limit, limit_text = crf_limit(max_memory, pool)
    check_crf_memory(paths, _image_sizes(paths, skip_bad), n_clusters, pool_backend(pool),
                     pool_concurrency(pool), max_pixels, limit, limit_text)


def _check_folders(input_dir, output_dir, alpha):
    if not 0 <= alpha <= 1:
        raise SmoosegError(f"alpha={alpha!r} must lie in [0, 1] (mask opacity in the overlay)")
    output_dir = check_output_dir(output_dir, "output_dir")
    if output_dir.resolve() == Path(input_dir).resolve():
        raise SmoosegError(f"output_dir {output_dir} is the input folder; pass another output_dir")
    return output_dir


@torch.no_grad()
def segment_folder(net, data, input_dir, output_dir, options=None, *, recursive=False,
                   crf_pool=None, crf_max_pixels=CRF_MAX_PIXELS, crf_max_memory="auto", class_map=None,
                   class_names=None, save_ids=False, alpha=0.5, skip_bad=False, show_progress=True):
    """Segment every image of ``input_dir`` into ``output_dir`` on the net's device; returns one
    dict per written image (keys ``image``, ``mask``, ``overlay``, ``side``, ``ids`` (None unless
    ``save_ids``)).

    ``options`` (:class:`PredictOptions`, None: its defaults) fit each image to the patch size.
    With a ``crf_pool``
    (:func:`smooseg.eval.crf_backend.open_crf`) the dense CRF refines each image while the next
    goes through the network, on at most ``crf_max_pixels`` pixels, after a memory check against
    ``crf_max_memory`` (:mod:`smooseg.eval.crf_memory`). ``class_map`` (cluster -> class, −1
    unmatched) colours and names clusters by class with ``class_names`` (default: those of
    ``data``, the :class:`DatasetInfo` the net was trained for, whose colour map is used).
    Unreadable images raise, or are skipped with a warning under ``skip_bad``.
    """
    output_dir = _check_folders(input_dir, output_dir, alpha)
    options = PredictOptions() if options is None else options
    options.fitted(net.patch_size)
    paths = list_images(input_dir, recursive, exclude=output_dir)
    colors = cluster_palette(net.n_clusters, data.name, class_map)
    names = cluster_names(net.n_clusters, class_map,
                          data.class_names if class_names is None else class_names)
    writer = _Writer(output_dir, colors, names, alpha, save_ids)
    crf = crf_pool is not None
    if crf:
        check_max_pixels(crf_max_pixels)
        parse_bytes(crf_max_memory)
        _check_crf_fits(paths, skip_bad, net.n_clusters, crf_pool, crf_max_pixels, crf_max_memory)
    pending = deque()

    def finish(handle, image, path, rel):
        writer.write(image, refined_ids(handle.result()[0], image.shape[:2]), path, rel)

    named = list(zip(paths, output_stems(paths, input_dir), strict=True))
    for path, rel in progress_bar(named, desc="segment", unit="img", disable=not show_progress):
        try:
            image = read_image(path)
        except SmoosegError as err:
            if not skip_bad:
                raise
            log.warning("skipped: %s", str(err).split(";")[0])
            continue
        crf_size = crf_shape(*image.shape[:2], crf_max_pixels) if crf else None
        ids, log_probs = predict_image(net, image, options, keep_log_probs=crf, log_size=crf_size)
        if not crf:
            writer.write(image, ids, path, rel)
            continue
        pending.append((crf_pool.submit([crf_image(image, crf_size)], [log_probs]), image, path, rel))
        while pending and pending[0][0].done():
            finish(*pending.popleft())
    while pending:
        finish(*pending.popleft())
    writer.write_legend()
    return writer.results


def _required(settings, key):
    value = getattr(settings, key)
    if not value:
        raise SmoosegError(f"{key} is required; pass {key}=<path>")
    return value


def predict_options(settings):
    """The :class:`PredictOptions` of :class:`smooseg.settings.SegmentSettings`."""
    return PredictOptions(mode=settings.mode, size=settings.size, stride=settings.stride,
                          flip=bool(settings.flip), batch_size=settings.batch_size,
                          precision=str(settings.precision))


def run_segment(settings):
    """Entry point of ``segment_images.py`` (resolved :class:`smooseg.settings.SegmentSettings`);
    returns the results of :func:`segment_folder`."""
    model_path, input_dir = _required(settings, "model_path"), _required(settings, "input_dir")
    options = predict_options(settings)
    list_images(input_dir, bool(settings.recursive), exclude=settings.output_dir)
    check_output_dir(settings.output_dir, "output_dir")
    check_input_file(model_path, "model_path", missing="not found",
                     fix="pass the path of a .ckpt file (a path with '=' quoted: 'model_path=\"a=b.ckpt\"')")
    device = resolve_device(settings.device)
    net, hparams = load_net(model_path, map_location=device)
    net.backbone_precision = options.precision  # the backbone runs at the precision asked for here
    data = DatasetInfo(**hparams["data"])
    class_map = names = None
    if settings.metrics_json:
        class_map, names = class_map_from_metrics(settings.metrics_json, net.n_clusters, data.n_classes,
                                                  checkpoint_sha256=file_sha256(model_path))
    pool = (open_crf(settings.crf_backend, device, settings.crf_workers, float(settings.crf_timeout))
            if settings.crf else None)
    try:
        results = segment_folder(
            net, data, input_dir, settings.output_dir, options, recursive=bool(settings.recursive),
            crf_pool=pool, crf_max_pixels=settings.crf_max_pixels, crf_max_memory=settings.crf_max_memory,
            class_map=class_map, class_names=names, save_ids=bool(settings.save_ids),
            alpha=float(settings.alpha), skip_bad=bool(settings.skip_bad),
            show_progress=bool(settings.progress))
    finally:
        if pool is not None:
            pool.close()
    print(f"segmented {len(results)} images into {settings.output_dir}")
    return results

