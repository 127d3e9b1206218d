"""Predicting one image of any size: cluster ids at the image's own size, optionally with the
cluster log-probabilities the dense CRF refines.

Two ways to fit an image to the backbone's patch size (:class:`PredictOptions`):
  * ``resize``: the shorter side is resized (bilinear, antialiased) to ``size`` and both sides
    are rounded to the nearest multiple of the patch size; the code is upsampled back to the
    original size and the teacher gives log_softmax(2·T) there (docs/method.md §5), in row stripes, so
    a large image never holds its full-resolution code in memory.
  * ``window``: ``size``×``size`` windows (``size`` rounded to a patch multiple; sides shorter
    than a window are zero-padded, in normalised space, to a patch multiple) every ``stride``
    pixels (default ``size // 2``), the last window flush with the border; cluster
    probabilities are averaged over overlapping windows at full resolution.

``segment_images.py`` and :func:`smooseg.load` both predict through :func:`predict_image`.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from smooseg.data.transforms import normalize
from smooseg.errors import SmoosegError
from smooseg.model.backbone import patch_multiple
from smooseg.runtime import autocast

MODES = ("resize", "window")
# Largest number of float elements one stripe of upsampled code / logits may hold (64 MiB).
STRIPE_ELEMENTS = 1 << 24


def _positive_int(value):
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class PredictOptions:
    """How an image is fitted to the patch size and predicted (the keys of ``segment.yaml``).

    ``size`` is the shorter side fed to the network (``resize``) or the window side (``window``);
    ``stride`` the window step (None: ``size // 2``); ``batch_size`` windows go through the
    network together; ``precision`` is the autocast of the pass, the backbone included.
    """

    mode: str = "resize"
    size: int = 320
    stride: int | None = None
    flip: bool = True
    batch_size: int = 8
    precision: str = "32"

    def __post_init__(self):
        if self.mode not in MODES:
            raise SmoosegError(f"mode={self.mode} is unknown; use one of {', '.join(MODES)}")
        if not _positive_int(self.size):
            raise SmoosegError(f"size={self.size!r} must be a positive number of pixels")
        if self.stride is not None and not _positive_int(self.stride):
            raise SmoosegError(f"stride={self.stride!r} must be a positive number of pixels or null "
                               "(size // 2)")
        if not _positive_int(self.batch_size):
            raise SmoosegError(f"batch_size={self.batch_size!r} must be a positive integer")

    def fitted(self, patch):
        """(size rounded to a multiple of ``patch``, stride) checked so that windows leave no gaps."""
        size = patch_multiple(self.size, patch)
        stride = size // 2 if self.stride is None else self.stride
        if self.mode == "window" and stride > size:
            raise SmoosegError(f"stride={stride} is larger than the window (size={size}, a multiple of the "
                               f"patch size {patch}); set stride <= size so that windows leave no gaps")
        return size, stride


def to_input(image, device):
    """ImageNet-normalised 1×3×H×W float tensor of an H×W×3 uint8 image."""
    image = np.ascontiguousarray(image)
    image = image if image.flags.writeable else image.copy()  # torch wants writable memory
    img = torch.as_tensor(image, device=device).permute(2, 0, 1)
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
    code = _resized_code(net, img, size, flip, precision)
    return _stripes_of(net, code, tuple(img.shape[-2:]), keep_log_probs, log_size)


def _window_boxes(padded, win_h, win_w, stride):
    return [(top, left) for top in window_starts(padded.shape[-2], win_h, stride)
            for left in window_starts(padded.shape[-1], win_w, stride)]


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
    boxes = _window_boxes(padded, win_h, win_w, stride)
    total = torch.zeros((net.n_clusters,) + tuple(padded.shape[-2:]), device=img.device)
    count = torch.zeros(tuple(padded.shape[-2:]), device=img.device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first:first + batch_size]
        batch = torch.cat([padded[..., top:top + win_h, left:left + win_w] for top, left in chunk])
        with autocast(img.device, precision):
            probs = net(batch, flip=flip).float().exp()
        for (top, left), p in zip(chunk, probs, strict=True):
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


def predict_image(net, image, options: PredictOptions, keep_log_probs=False, log_size=None):
    """Cluster ids (H×W int64) of an H×W×3 uint8 ``image`` on the net's device, fitted to the patch
    size by ``options``, and (with ``keep_log_probs``) its K×h×w log-probabilities at ``log_size``."""
    device = next(net.parameters()).device
    size, stride = options.fitted(net.patch_size)
    img = to_input(image, device)
    if options.mode == "resize":
        return predict_resize(net, img, size, options.flip, keep_log_probs, options.precision, log_size)
    return predict_window(net, img, size, stride, options.flip, options.batch_size, keep_log_probs,
                          options.precision, log_size)


def _stripes_of(net, code, size, keep_log_probs, log_size):
    """(ids, log-probs or None) of one 1×D×h×w ``code`` upsampled to ``size`` (as predict_resize)."""
    ids = np.empty(size, dtype=np.int64)
    log_size = tuple(size) if log_size is None else tuple(log_size)
    log_probs = np.empty((net.n_clusters, *log_size), np.float32) if keep_log_probs else None
    for top, bottom, stripe in log_prob_stripes(net, code, size):
        ids[top:bottom] = stripe[0].argmax(0).cpu().numpy()
        if keep_log_probs and log_size == tuple(size):
            log_probs[:, top:bottom] = stripe[0].cpu().numpy()
    if keep_log_probs and log_size != tuple(size):
        for top, bottom, stripe in log_prob_stripes(net, code, log_size):
            log_probs[:, top:bottom] = stripe[0].cpu().numpy()
    return ids, log_probs


@torch.no_grad()
def predict_images(net, images, options: PredictOptions, keep_log_probs=False, log_sizes=None):
    """:func:`predict_image` of each H×W×3 uint8 image of ``images``; in resize mode images of one
    size go through the network together, ``options.batch_size`` at a time."""
    log_sizes = [None] * len(images) if log_sizes is None else list(log_sizes)
    if options.mode == "window":
        return [predict_image(net, image, options, keep_log_probs, size)
                for image, size in zip(images, log_sizes, strict=True)]
    device = next(net.parameters()).device
    size, _ = options.fitted(net.patch_size)
    results = [None] * len(images)
    groups = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(index)
    for shape, indices in groups.items():
        for first in range(0, len(indices), options.batch_size):
            chunk = indices[first:first + options.batch_size]
            img = torch.cat([to_input(images[i], device) for i in chunk])
            code = _resized_code(net, img, size, options.flip, options.precision)
            for row, i in enumerate(chunk):
                results[i] = _stripes_of(net, code[row:row + 1], shape, keep_log_probs, log_sizes[i])
    return results


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
