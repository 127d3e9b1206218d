"""Segment a folder of your own images with a trained SmooSeg model.

For each image ``<stem>_mask.png`` (colour mask), ``<stem>_overlay.png`` (the mask blended over
the image) and optionally ``<stem>_ids.png`` (raw cluster ids; uint8, uint16 beyond 256 clusters),
all at the image's original size (after EXIF orientation). With ``recursive`` the input's
subfolders are mirrored in the output. Two images with the same stem in one folder (``a.jpg``,
``a.png``) are told apart by their extension (``a_jpg_mask.png``, ``a_png_mask.png``).

Any image size is handled in one of two ways:
  * ``resize``: the shorter side is resized (bilinear, antialiased) to ``size`` and both sides
    are rounded to the nearest multiple of the patch size; the code is upsampled back to the
    original size and the teacher gives log_softmax(2·T) there (docs/method.md §5), in row stripes, so
    a large image never holds its full-resolution code in memory.
  * ``window``: ``size``×``size`` windows (``size`` rounded to a patch multiple; sides shorter
    than a window are zero-padded, in normalised space, to a patch multiple) every ``stride``
    pixels (default ``size // 2``), the last window flush with the border; cluster
    probabilities are averaged over overlapping windows at full resolution.

Colours: without a class map cluster k takes palette colour k. With a cluster -> class map (from
an evaluation ``metrics.json``) a matched cluster takes its class colour and each unmatched
(extra) cluster one of the palette colours after the classes; ``legend.png`` in the output
folder lists the colours with their class names.
"""

import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from smooseg.model.backbone import patch_multiple
from smooseg.model.checkpoints import load_net
from smooseg.eval.crf_backend import open_crf
from smooseg.data.datasets import DatasetInfo
from smooseg.data.transforms import normalize
from smooseg.errors import SmoosegError
from smooseg.io import IMAGE_EXTENSIONS, read_rgb
from smooseg.runtime import autocast, resolve_device
from smooseg.eval.metrics import cluster_to_class_map
from smooseg.viz import class_colors, colormap, legend_image, overlay, read_metrics_json, save_png

log = logging.getLogger(__name__)

MODES = ("resize", "window")
# Largest number of float elements one stripe of upsampled code / logits may hold (64 MiB).
STRIPE_ELEMENTS = 1 << 24


def list_images(input_dir, recursive=False, exclude=None):
    """Sorted image files of ``input_dir`` (subfolders too when ``recursive``), skipping hidden
    files and anything under ``exclude`` (the output folder when it lies inside the input)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise SmoosegError(f"input_dir {root} is not a folder; pass input_dir=<folder of images>")
    exclude = None if exclude is None else Path(exclude).resolve()
    found = []
    for path in root.rglob("*") if recursive else root.iterdir():
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        if path.is_file():
            found.append(path)
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
            for r, k in zip(rels, keys)]


def read_image(path):
    """H×W×3 uint8 RGB of an image file (EXIF orientation applied); SmoosegError naming the file."""
    return np.array(read_rgb(path, exif=True, fix="fix or remove it, or set skip_bad=true to skip "
                                                   "unreadable images"))


def to_input(image, device):
    """ImageNet-normalised 1×3×H×W float tensor of an H×W×3 uint8 image."""
    img = torch.as_tensor(np.ascontiguousarray(image), device=device).permute(2, 0, 1)
    return normalize(img.float().div_(255))[None]


def resized_shape(height, width, size, patch):
    """(H, W) with the shorter side scaled to ``size``, each side rounded to a patch multiple."""
    scale = size / min(height, width)
    return patch_multiple(height * scale, patch), patch_multiple(width * scale, patch)


def window_starts(length, window, stride):
    """Start offsets of windows covering ``length``; the last window ends at ``length``."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def bilinear_matrix(out_len, in_len, device=None):
    """out_len×in_len weights W such that W @ x resamples x along one axis exactly like
    ``F.interpolate(mode="bilinear", align_corners=False)`` (which is separable)."""
    src = ((torch.arange(out_len, device=device, dtype=torch.float64) + 0.5) * (in_len / out_len) - 0.5)
    src = src.clamp(min=0)
    lo = src.floor().long().clamp(max=in_len - 1)
    hi = (lo + 1).clamp(max=in_len - 1)
    frac = (src - lo).to(torch.float32)
    weights = torch.zeros(out_len, in_len, device=device)
    rows = torch.arange(out_len, device=device)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights


def log_prob_stripes(net, code, size, max_elements=STRIPE_ELEMENTS):
    """Yield ``(top, bottom, log_probs)`` stripes (1×K×rows×W) of the cluster log-probabilities of
    a 1×D×h×w ``code`` upsampled to ``size`` (the net's prediction, docs/method.md section 5)."""
    height, width = size
    weights_y = bilinear_matrix(height, code.shape[-2], code.device)
    along_x = code @ bilinear_matrix(width, code.shape[-1], code.device).T   # 1×D×h×W
    channels = max(code.shape[1], net.n_clusters)
    rows = max(1, max_elements // (channels * width))
    for top in range(0, height, rows):
        stripe = weights_y[top:top + rows] @ along_x
        yield top, top + stripe.shape[-2], net.log_probs_at(stripe)


@torch.no_grad()
def predict_resize(net, img, size, flip=True, keep_log_probs=False, precision="32"):
    """Resize mode on one 1×3×H×W image -> (ids H×W int64 numpy, K×H×W float32 log-probs or None)."""
    height, width = img.shape[-2:]
    patch = net.patch_size
    net_in = F.interpolate(img, size=resized_shape(height, width, size, patch), mode="bilinear",
                           align_corners=False, antialias=True)
    with autocast(img.device, precision):
        code = net.predict_code(net_in, flip).float()
    ids = np.empty((height, width), dtype=np.int64)
    log_probs = np.empty((net.n_clusters, height, width), np.float32) if keep_log_probs else None
    for top, bottom, stripe in log_prob_stripes(net, code, (height, width)):
        ids[top:bottom] = stripe[0].argmax(0).cpu().numpy()
        if keep_log_probs:
            log_probs[:, top:bottom] = stripe[0].cpu().numpy()
    return ids, log_probs


@torch.no_grad()
def predict_window(net, img, size, stride, flip=True, batch_size=8, keep_log_probs=False,
                   precision="32"):
    """Window mode on one 1×3×H×W image -> (ids H×W int64 numpy, K×H×W float32 log-probs or None).

    The log-probabilities are the log of the cluster probabilities averaged over every window
    that covers a pixel.
    """
    if not 1 <= stride <= size:
        raise SmoosegError(f"stride={stride} must lie in [1, size={size}] so that windows leave no gaps")
    height, width = img.shape[-2:]
    patch = net.patch_size
    win_h = min(size, -(-height // patch) * patch)
    win_w = min(size, -(-width // patch) * patch)
    padded = F.pad(img, (0, max(0, win_w - width), 0, max(0, win_h - height)))
    boxes = [(top, left) for top in window_starts(padded.shape[-2], win_h, stride)
             for left in window_starts(padded.shape[-1], win_w, stride)]
    total = torch.zeros((net.n_clusters,) + tuple(padded.shape[-2:]), device=img.device)
    count = torch.zeros(tuple(padded.shape[-2:]), device=img.device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first:first + batch_size]
        batch = torch.cat([padded[..., t:t + win_h, l:l + win_w] for t, l in chunk])
        with autocast(img.device, precision):
            probs = net(batch, flip=flip).float().exp()
        for (top, left), p in zip(chunk, probs):
            total[:, top:top + win_h, left:left + win_w] += p
            count[top:top + win_h, left:left + win_w] += 1
    log_probs = (total / count).log()[:, :height, :width]
    return log_probs.argmax(0).cpu().numpy(), log_probs.cpu().numpy() if keep_log_probs else None


def class_map_from_metrics(path, n_clusters, n_classes=None):
    """(cluster -> class LongTensor[K] with −1 for unmatched clusters, class names) of a metrics.json."""
    metrics = read_metrics_json(path)
    assignment, names = metrics["assignment"], metrics["class_names"]
    if n_classes is not None and len(names) != n_classes:
        raise SmoosegError(f"metrics JSON {path} has {len(names)} classes but the model {n_classes}; "
                           "pass the metrics.json of an evaluation of this checkpoint")
    if assignment.max() >= n_clusters:
        raise SmoosegError(f"metrics JSON {path} assigns cluster {assignment.max()} but the model has "
                           f"{n_clusters} clusters; pass the metrics.json of an evaluation of this checkpoint")
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


def legend_entries(class_map, class_names, colors):
    """(names, colours) for the legend: the classes in order, then each unmatched cluster."""
    class_map = np.asarray(class_map, dtype=np.int64)
    names, swatches = [], []
    for c, name in enumerate(class_names):
        clusters = np.flatnonzero(class_map == c)
        if len(clusters):
            names.append(f"{name} (cluster {clusters[0]})")
            swatches.append(colors[clusters[0]])
    for k in np.flatnonzero(class_map < 0):
        names.append(f"cluster {k} (unmatched)")
        swatches.append(colors[k])
    return names, swatches


def _check_options(mode, size, stride, batch_size, alpha):
    if mode not in MODES:
        raise SmoosegError(f"mode={mode} is unknown; use one of {', '.join(MODES)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SmoosegError(f"size={size!r} must be a positive number of pixels")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise SmoosegError(f"stride={stride!r} must be a positive number of pixels or null (size // 2)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SmoosegError(f"batch_size={batch_size!r} must be a positive integer")
    if not 0 <= alpha <= 1:
        raise SmoosegError(f"alpha={alpha!r} must lie in [0, 1] (mask opacity in the overlay)")


@torch.no_grad()
def segment_folder(net, data, input_dir, output_dir, recursive=False, mode="resize", size=320,
                   stride=None, flip=True, crf=False, crf_pool=None, save_ids=False, class_map=None,
                   class_names=None, alpha=0.5, device="auto", precision="32",
                   batch_size=8, skip_bad=False, show_progress=True):
    """Segment every image of ``input_dir`` into ``output_dir``; returns one dict per written image
    (keys ``image``, ``mask``, ``overlay``, ``ids`` (None unless ``save_ids``)).

    ``size`` is the shorter side fed to the network (``resize``) or the window side (``window``);
    ``stride`` the window step (None: ``size // 2``). ``batch_size`` windows go through the
    network together. ``crf`` refines with the dense CRF in ``crf_pool`` (None: in-process);
    the CRF of one image runs while the next goes through the network. ``class_map``
    (cluster -> class, −1 unmatched) colours by class and writes ``legend.png`` with
    ``class_names`` (default: those of ``data``, the :class:`DatasetInfo` the net was trained for,
    whose colour map is used). Unreadable images raise, or are skipped with a
    warning under ``skip_bad``.
    """
    _check_options(mode, size, stride, batch_size, alpha)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SmoosegError(f"output_dir {output_dir} is a file; pass a folder path")
    if output_dir.resolve() == Path(input_dir).resolve():
        raise SmoosegError(f"output_dir {output_dir} is the input folder; pass another output_dir")
    paths = list_images(input_dir, recursive, exclude=output_dir)
    device = resolve_device(device)
    net = net.to(device).eval()
    net.backbone_precision = str(precision)  # the backbone runs at the precision asked for here
    patch = net.patch_size
    size = patch_multiple(size, patch)
    stride = size // 2 if stride is None else stride
    if mode == "window" and stride > size:
        raise SmoosegError(f"stride={stride} is larger than the window (size={size}, a multiple of the "
                           f"patch size {patch}); set stride <= size so that windows leave no gaps")
    colors = cluster_palette(net.n_clusters, data.name, class_map)
    if class_map is not None:
        names = data.class_names if class_names is None else list(class_names)
        save_png(legend_image(*legend_entries(class_map, names, colors)), output_dir / "legend.png")
    own_pool = crf_pool is None and crf
    pool = open_crf("pydensecrf", device) if own_pool else crf_pool
    results, pending = [], deque()

    def write(image, ids, base):
        out = {"image": base[0], "ids": None}
        stem = output_dir / base[1]
        mask = colors[ids]
        out["mask"] = save_png(mask, stem.parent / f"{stem.name}_mask.png")
        out["overlay"] = save_png(overlay(image, mask, alpha), stem.parent / f"{stem.name}_overlay.png")
        if save_ids:
            dtype = np.uint8 if net.n_clusters <= 256 else np.uint16
            out["ids"] = save_png(ids.astype(dtype), stem.parent / f"{stem.name}_ids.png")
        results.append(out)

    def finish(handle, image, base):
        write(image, handle.result()[0].argmax(0), base)

    try:
        for path, rel in tqdm(list(zip(paths, output_stems(paths, input_dir))), desc="segment",
                              unit="img", disable=not show_progress):
            try:
                image = read_image(path)
            except SmoosegError as err:
                if not skip_bad:
                    raise
                log.warning("skipped: %s", str(err).split(";")[0])
                continue
            img = to_input(image, device)
            if mode == "resize":
                ids, log_probs = predict_resize(net, img, size, flip, crf, precision)
            else:
                ids, log_probs = predict_window(net, img, size, stride, flip, batch_size, crf,
                                                precision)
            if crf:
                pending.append((pool.submit([image], [log_probs]), image, (path, rel)))
                while pending and pending[0][0].done():
                    finish(*pending.popleft())
            else:
                write(image, ids, (path, rel))
        while pending:
            finish(*pending.popleft())
    finally:
        if own_pool:
            pool.close()
    return results


def run_segment(cfg):
    """Entry point of ``segment_images.py`` (config ``configs/segment.yaml``); returns the results."""
    for key in ("model_path", "input_dir"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise SmoosegError(f"{key} is required; pass {key}=<path>")
    list_images(cfg.input_dir, bool(cfg.recursive), exclude=cfg.output_dir)
    device = resolve_device(cfg.device)
    net, hparams = load_net(cfg.model_path, map_location=device)
    data = DatasetInfo(**hparams["data"])
    class_map = names = None
    if cfg.metrics_json:
        class_map, names = class_map_from_metrics(cfg.metrics_json, net.n_clusters, data.n_classes)
    pool = open_crf(cfg.crf_backend, device, cfg.crf_workers, float(cfg.crf_timeout)) if cfg.crf else None
    try:
        results = segment_folder(
            net, data, cfg.input_dir, cfg.output_dir, recursive=bool(cfg.recursive), mode=cfg.mode,
            size=cfg.size, stride=cfg.stride, flip=bool(cfg.flip), crf=bool(cfg.crf), crf_pool=pool,
            save_ids=bool(cfg.save_ids), class_map=class_map, class_names=names,
            alpha=float(cfg.alpha), device=device, precision=cfg.precision,
            batch_size=cfg.batch_size, skip_bad=bool(cfg.skip_bad), show_progress=bool(cfg.progress))
    finally:
        if pool is not None:
            pool.close()
    print(f"segmented {len(results)} images into {cfg.output_dir}")
    return results
