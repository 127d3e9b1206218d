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

The dense CRF (``crf``) runs on at most ``crf_max_pixels`` pixels: a larger image is resized
(bilinear, antialiased) to fit, together with its cluster log-probabilities, and the refined
probabilities are upsampled (bilinear, in row stripes) back to the full size before the argmax.
Before the first image, the CRF's memory is estimated for the largest image
(:func:`crf_bytes_per_pixel`, times the CRF jobs that run at once) and the run is refused, naming
the image, its size, the estimate and the settings to change, when it exceeds ``crf_max_memory``
(``auto``: the memory available now: RAM, within a cgroup limit, or the GPU's for the torch CRF on CUDA).

Colours: without a class map cluster k takes palette colour k. With a cluster -> class map (from
an evaluation ``metrics.json``) a matched cluster takes its class colour and each unmatched
(extra) cluster one of the palette colours after the classes; ``legend.png`` in the output
folder lists the colours with their class names.
"""

import logging
import math
import re
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from smooseg.data.datasets import DatasetInfo
from smooseg.data.transforms import normalize
from smooseg.errors import SmoosegError
from smooseg.eval.crf_backend import TorchCRF, open_crf
from smooseg.eval.metrics import cluster_to_class_map
from smooseg.io import IMAGE_EXTENSIONS, check_input_file, check_output_dir, image_size, read_rgb
from smooseg.model.backbone import patch_multiple
from smooseg.model.checkpoints import load_net
from smooseg.runtime import autocast, resolve_device
from smooseg.viz import class_colors, colormap, legend_image, overlay, read_metrics_json, save_png

log = logging.getLogger(__name__)

MODES = ("resize", "window")
# Largest number of float elements one stripe of upsampled code / logits may hold (64 MiB).
STRIPE_ELEMENTS = 1 << 24
# The dense CRF runs on at most this many pixels by default (crf_max_pixels); larger images are
# refined at this size and the result upsampled.
CRF_MAX_PIXELS = 4_000_000
# Peak bytes per pixel of one dense CRF image with K clusters, as (per cluster, fixed): the whole
# process's peak on colour noise (the worst case: its lattices have the most vertices; smooth
# photos need about half), measured + 5 %. pydensecrf2: 69·K + 711 measured (1.1 kB at K = 6,
# 2.6 kB at K = 27); torch (smooseg/eval/crf_torch.py states ~2.0 kB of live tensors at K = 27):
# 53·K + 1616 measured, allocator included.
CRF_BYTES_PER_PIXEL = {"pydensecrf": (72, 750), "torch": (56, 1700)}
HINTS = ("fix or remove it, or set skip_bad=true to skip unreadable images")


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
    return np.array(read_rgb(path, exif=True, fix=HINTS))


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


def _resized_code(net, img, size, flip, precision):
    height, width = img.shape[-2:]
    net_in = F.interpolate(img, size=resized_shape(height, width, size, net.patch_size), mode="bilinear",
                           align_corners=False, antialias=True)
    with autocast(img.device, precision):
        return net.predict_code(net_in, flip).float()


@torch.no_grad()
def predict_resize(net, img, size, flip=True, keep_log_probs=False, precision="32", log_size=None):
    """Resize mode on one 1×3×H×W image -> (ids H×W int64 numpy, K×h×w float32 log-probs or None);
    the log-probabilities are at ``log_size`` = (h, w) (default the image's H×W)."""
    height, width = img.shape[-2:]
    code = _resized_code(net, img, size, flip, precision)
    log_size = (height, width) if log_size is None else tuple(log_size)
    ids = np.empty((height, width), dtype=np.int64)
    log_probs = np.empty((net.n_clusters, *log_size), np.float32) if keep_log_probs else None
    for top, bottom, stripe in log_prob_stripes(net, code, (height, width)):
        ids[top:bottom] = stripe[0].argmax(0).cpu().numpy()
        if keep_log_probs and log_size == (height, width):
            log_probs[:, top:bottom] = stripe[0].cpu().numpy()
    if keep_log_probs and log_size != (height, width):
        for top, bottom, stripe in log_prob_stripes(net, code, log_size):
            log_probs[:, top:bottom] = stripe[0].cpu().numpy()
    return ids, log_probs


@torch.no_grad()
def predict_window(net, img, size, stride, flip=True, batch_size=8, keep_log_probs=False,
                   precision="32", log_size=None):
    """Window mode on one 1×3×H×W image -> (ids H×W int64 numpy, K×h×w float32 log-probs or None).

    The log-probabilities are the log of the cluster probabilities averaged over every window
    that covers a pixel; at ``log_size`` = (h, w) (default H×W) those are area-averaged first.
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
    probs = (total / count)[:, :height, :width]
    del total
    ids = probs.argmax(0).cpu().numpy()
    if not keep_log_probs:
        return ids, None
    if log_size is not None and tuple(log_size) != (height, width):
        probs = F.interpolate(probs[None], size=tuple(log_size), mode="area")[0]
    return ids, probs.log().cpu().numpy()


def upsampled_argmax(probs, size, max_elements=STRIPE_ELEMENTS):
    """Argmax (H×W int64) of K×h×w probabilities resized bilinearly to ``size`` = (H, W), in row
    stripes of at most ``max_elements`` values, so the K×H×W upsampled array never exists."""
    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    n, h, w = probs.shape
    height, width = size
    weights_y = bilinear_matrix(height, h)
    weights_x = bilinear_matrix(width, w).T
    ids = np.empty((height, width), dtype=np.int64)
    rows = max(1, max_elements // (n * width))
    for top in range(0, height, rows):
        band = weights_y[top:top + rows]
        used = torch.nonzero(band.abs().sum(0)).flatten()
        lo, hi = int(used.min()), int(used.max()) + 1
        stripe = torch.einsum("rh,khw->krw", band[:, lo:hi], probs[:, lo:hi]) @ weights_x
        ids[top:top + band.shape[0]] = stripe.argmax(0).numpy()
    return ids


def crf_shape(height, width, max_pixels):
    """(h, w): the image's size when it has at most ``max_pixels`` pixels, else the largest size of
    the same aspect ratio that has (each side at least 1)."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    while h * w > max_pixels and max(h, w) > 1:
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w


def crf_bytes_per_pixel(backend, n_clusters):
    """Peak bytes per pixel of one dense CRF image (:data:`CRF_BYTES_PER_PIXEL`)."""
    per_cluster, fixed = CRF_BYTES_PER_PIXEL[backend]
    return per_cluster * int(n_clusters) + fixed


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(value, key="crf_max_memory"):
    """``auto`` -> None; a number of bytes, or a size such as ``8GB``, ``512MB``, ``1.5GiB`` -> bytes."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not match or float(match.group(1)) <= 0:
        raise SmoosegError(f"{key}={value!r} is not a memory size; use auto, a number of bytes or a size "
                           f"such as {key}=8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _read_int(path):
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_memory():
    """Bytes of RAM this process can still take: MemAvailable, within the cgroup's limit when there
    is one (Linux); None where neither can be read."""
    known = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    limit, used = _read_int(cgroup / "memory.max"), _read_int(cgroup / "memory.current")
    if limit is not None and used is not None:                      # cgroup v2
        reclaimable = 0
        try:
            for line in (cgroup / "memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):
                    reclaimable = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        known.append(max(0, limit - used + reclaimable))
    else:                                                            # cgroup v1
        limit = _read_int(cgroup / "memory" / "memory.limit_in_bytes")
        used = _read_int(cgroup / "memory" / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < 2**60:
            known.append(max(0, limit - used))
    return min(known) if known else None


def available_memory(device):
    """Bytes free for the CRF on ``device``: the GPU's free memory (plus what torch holds cached)
    for CUDA, else :func:`host_available_memory`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return host_available_memory()


def _gb(n_bytes):
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"


def check_crf_memory(paths, sizes, n_clusters, backend, concurrent, max_pixels, limit, limit_text):
    """SmoosegError unless the dense CRF of the largest image fits in ``limit`` bytes (None: no check).

    ``sizes`` are (width, height) per path (None: skipped); ``concurrent`` CRF jobs run at once.
    """
    candidates = [(crf_shape(h, w, max_pixels), (w, h), path)
                  for path, size in zip(paths, sizes) if size is not None for w, h in [size]]
    if limit is None or not candidates:
        return
    (h, w), (width, height), path = max(candidates, key=lambda c: c[0][0] * c[0][1])
    per_pixel = crf_bytes_per_pixel(backend, n_clusters) * concurrent
    need = per_pixel * h * w
    if need <= limit:
        return
    at = f", refined at {w}x{h} = crf_max_pixels={max_pixels}" if (h, w) != (height, width) else ""
    jobs = f" ({concurrent} CRF jobs at once)" if concurrent > 1 else ""
    fits = int(limit / per_pixel * 0.9) // 10_000 * 10_000
    fix = (f"lower crf_max_pixels (e.g. crf_max_pixels={fits}), " if fits >= 10_000 else "")
    fix += "use fewer crf_workers, " if concurrent > 1 else ""
    raise SmoosegError(
        f"the dense CRF of {path} ({width}x{height} px{at}) needs about {_gb(need)}{jobs} with the "
        f"{backend} CRF at {n_clusters} clusters, but {limit_text.format(_gb(limit))}; {fix}or set crf=false")


def _crf_limit(max_memory, backend, pool):
    """(bytes the CRF may use or None, how to say it) for ``crf_max_memory=max_memory``."""
    limit = parse_bytes(max_memory)
    if limit is not None:
        return limit, f"crf_max_memory={max_memory} allows {{}}"
    device = pool.device if backend == "torch" else "cpu"
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    return available_memory(device), f"only {{}} of {where} are available (crf_max_memory=auto)"


def _check_max_pixels(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SmoosegError(f"crf_max_pixels={value!r} must be a positive number of pixels, e.g. "
                           f"crf_max_pixels={CRF_MAX_PIXELS}")
    return value


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
                   batch_size=8, skip_bad=False, show_progress=True, crf_max_pixels=CRF_MAX_PIXELS,
                   crf_max_memory="auto"):
    """Segment every image of ``input_dir`` into ``output_dir``; returns one dict per written image
    (keys ``image``, ``mask``, ``overlay``, ``ids`` (None unless ``save_ids``)).

    ``size`` is the shorter side fed to the network (``resize``) or the window side (``window``);
    ``stride`` the window step (None: ``size // 2``). ``batch_size`` windows go through the
    network together. ``crf`` refines with the dense CRF in ``crf_pool`` (None: in-process);
    the CRF of one image runs while the next goes through the network, on at most
    ``crf_max_pixels`` pixels, after a memory check against ``crf_max_memory`` (``auto``: what is
    available; see the module docstring). ``class_map``
    (cluster -> class, −1 unmatched) colours by class and writes ``legend.png`` with
    ``class_names`` (default: those of ``data``, the :class:`DatasetInfo` the net was trained for,
    whose colour map is used). Unreadable images raise, or are skipped with a
    warning under ``skip_bad``.
    """
    _check_options(mode, size, stride, batch_size, alpha)
    output_dir = check_output_dir(output_dir, "output_dir")
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
    if crf:
        crf_max_pixels = _check_max_pixels(crf_max_pixels)
        parse_bytes(crf_max_memory)
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
        probs = handle.result()[0]
        if probs.shape[1:] == image.shape[:2]:
            write(image, probs.argmax(0), base)
        else:  # refined at crf_max_pixels: upsample the probabilities, then the argmax
            write(image, upsampled_argmax(probs, image.shape[:2]), base)

    try:
        if crf:
            backend = "torch" if isinstance(pool, TorchCRF) else "pydensecrf"
            concurrent = 1 if backend == "torch" else max(1, min(int(getattr(pool, "num_workers", 0)),
                                                                 int(getattr(pool, "max_in_flight", 1))))
            limit, limit_text = _crf_limit(crf_max_memory, backend, pool)
            sizes = []
            for path in paths:
                try:
                    sizes.append(image_size(path, exif=True, fix=HINTS))
                except SmoosegError:
                    if not skip_bad:
                        raise
                    sizes.append(None)  # skipped, with its warning, when its turn comes
            check_crf_memory(paths, sizes, net.n_clusters, backend, concurrent, crf_max_pixels, limit,
                             limit_text)
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
            crf_size = crf_shape(*image.shape[:2], crf_max_pixels) if crf else None
            if mode == "resize":
                ids, log_probs = predict_resize(net, img, size, flip, crf, precision, log_size=crf_size)
            else:
                ids, log_probs = predict_window(net, img, size, stride, flip, batch_size, crf,
                                                precision, log_size=crf_size)
            del img
            if crf:
                crf_image = image
                if crf_size != image.shape[:2]:
                    crf_image = np.asarray(Image.fromarray(image).resize(crf_size[::-1], Image.BILINEAR))
                pending.append((pool.submit([crf_image], [log_probs]), image, (path, rel)))
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
    """Entry point of ``segment_images.py`` (resolved :class:`smooseg.settings.SegmentSettings`);
    returns the results."""
    for key in ("model_path", "input_dir"):
        if not getattr(cfg, key):
            raise SmoosegError(f"{key} is required; pass {key}=<path>")
    list_images(cfg.input_dir, bool(cfg.recursive), exclude=cfg.output_dir)
    check_output_dir(cfg.output_dir, "output_dir")
    check_input_file(cfg.model_path, "model_path", missing="not found",
                     fix="pass the path of a .ckpt file (a path with '=' quoted: 'model_path=\"a=b.ckpt\"')")
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
            batch_size=cfg.batch_size, skip_bad=bool(cfg.skip_bad), show_progress=bool(cfg.progress),
            crf_max_pixels=cfg.crf_max_pixels, crf_max_memory=cfg.crf_max_memory)
    finally:
        if pool is not None:
            pool.close()
    print(f"segmented {len(results)} images into {cfg.output_dir}")
    return results
