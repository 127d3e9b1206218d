"""The dense CRF's memory bound when segmenting images of any size.

The CRF runs on at most ``crf_max_pixels`` pixels: a larger image is resized (bilinear,
antialiased) to fit, together with its cluster log-probabilities, and the refined probabilities
are upsampled (bilinear, in row stripes) back to the full size before the argmax. Before the
first image, the CRF's memory is estimated for the largest image (:func:`crf_bytes_per_pixel`,
times the CRF jobs that run at once) and the run is refused, naming the image, its size, the
estimate and the settings to change, when it exceeds ``crf_max_memory`` (``auto``: the memory
available now: RAM, within a cgroup limit, or the GPU's for the torch CRF on CUDA).
"""

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smooseg.errors import SmoosegError
from smooseg.eval.crf_backend import TorchCRF
from smooseg.eval.predict import upsampled_argmax

# The dense CRF runs on at most this many pixels by default (crf_max_pixels); larger images are
# refined at this size and the result upsampled.
CRF_MAX_PIXELS = 4_000_000
# Peak bytes per pixel of one dense CRF image with K clusters, as (per cluster, fixed): the whole
# process's peak on colour noise (the worst case: its lattices have the most vertices; smooth
# photos need about half), measured + 5 %. pydensecrf2: 69·K + 711 measured (1.1 kB at K = 6,
# 2.6 kB at K = 27); torch (smooseg/eval/crf_torch.py states ~2.0 kB of live tensors at K = 27):
# 53·K + 1616 measured, allocator included.
CRF_BYTES_PER_PIXEL = {"pydensecrf": (72, 750), "torch": (56, 1700)}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


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


def crf_image(image, crf_size):
    """The H×W×3 uint8 ``image`` the CRF sees at ``crf_size`` = (h, w) (bilinear when resized)."""
    if tuple(crf_size) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(crf_size)[::-1], Image.BILINEAR))


def refined_ids(probs, shape):
    """Cluster ids at ``shape`` = (H, W) of the CRF's K×h×w probabilities (upsampled when smaller)."""
    if probs.shape[1:] == tuple(shape):
        return probs.argmax(0)
    return upsampled_argmax(probs, shape)


def crf_bytes_per_pixel(backend, n_clusters):
    """Peak bytes per pixel of one dense CRF image (:data:`CRF_BYTES_PER_PIXEL`)."""
    per_cluster, fixed = CRF_BYTES_PER_PIXEL[backend]
    return per_cluster * int(n_clusters) + fixed


def parse_bytes(value, key="crf_max_memory"):
    """``auto`` -> None; a number of bytes, or a size such as ``8GB``, ``512MB``, ``1.5GiB`` -> bytes."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:I?B)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not match or float(match.group(1)) <= 0:
        raise SmoosegError(f"{key}={value!r} is not a memory size; use auto, a number of bytes or a size "
                           f"such as {key}=8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_max_pixels(value):
    """``crf_max_pixels`` when it is a positive integer, else a SmoosegError naming the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SmoosegError(f"crf_max_pixels={value!r} must be a positive number of pixels, e.g. "
                           f"crf_max_pixels={CRF_MAX_PIXELS}")
    return value


def _read_int(path):
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(cgroup=Path("/sys/fs/cgroup")):
    limit, used = _read_int(cgroup / "memory.max"), _read_int(cgroup / "memory.current")
    if limit is not None and used is not None:                      # cgroup v2
        reclaimable = 0
        try:
            for line in (cgroup / "memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):
                    reclaimable = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return max(0, limit - used + reclaimable)
    limit = _read_int(cgroup / "memory" / "memory.limit_in_bytes")  # cgroup v1
    used = _read_int(cgroup / "memory" / "memory.usage_in_bytes")
    if limit is not None and used is not None and limit < 2**60:
        return max(0, limit - used)
    return None


def host_available_memory():
    """Bytes of RAM this process can still take: MemAvailable, within the cgroup's limit when there
    is one (Linux); None where neither can be read."""
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
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
                  for path, size in zip(paths, sizes, strict=True) if size is not None for w, h in [size]]
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


def pool_backend(pool):
    """``torch`` or ``pydensecrf``: which CRF ``pool`` runs."""
    return "torch" if isinstance(pool, TorchCRF) else "pydensecrf"


def pool_concurrency(pool):
    """How many CRF images ``pool`` holds in memory at once."""
    if pool_backend(pool) == "torch":
        return 1
    return max(1, min(int(getattr(pool, "num_workers", 0)), int(getattr(pool, "max_in_flight", 1))))


def crf_limit(max_memory, pool):
    """(bytes the CRF may use or None, how to say it) for ``crf_max_memory=max_memory``."""
    limit = parse_bytes(max_memory)
    if limit is not None:
        return limit, f"crf_max_memory={max_memory} allows {{}}"
    device = pool.device if pool_backend(pool) == "torch" else "cpu"
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    return available_memory(device), f"only {{}} of {where} are available (crf_max_memory=auto)"
