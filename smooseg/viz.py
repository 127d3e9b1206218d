"""Colour maps, coloured label images, overlays and PNG writing (plotting lives here only)."""

from pathlib import Path

import numpy as np
from PIL import Image

from smooseg.errors import atomic_write

# Official Cityscapes colours for labelIds 7..33 (the 27 classes, in class order).
CITYSCAPES_COLORS = [
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230),
    (119, 11, 32),
]

POTSDAM_COLORS = [(255, 255, 255), (0, 0, 255), (0, 255, 0)]

IGNORE_COLOR = (0, 0, 0)


def pascal_colors(n):
    """The Pascal VOC bit-interleaving palette (also used for COCO-Stuff), skipping black."""
    colors = []
    for index in range(1, n + 1):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return colors


def colormap(dataset_name, n):
    """An ``n``×3 uint8 palette for ``dataset_name``; clusters beyond a data set's palette get Pascal colours."""
    base = {"cityscapes": CITYSCAPES_COLORS, "potsdam": POTSDAM_COLORS}.get(dataset_name, [])
    colors = list(base[:n])
    if len(colors) < n:
        extra = [c for c in pascal_colors(n + len(base)) if c not in colors]
        colors += extra[: n - len(colors)]
    return np.asarray(colors, dtype=np.uint8)


def colorize(label, palette):
    """Colour an integer H×W label map; negative ids (ignore / unmatched) are black."""
    label = np.asarray(label)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    out[~valid] = IGNORE_COLOR
    return out


def overlay(image, color_mask, alpha=0.5):
    """Blend an H×W×3 uint8 colour mask over an H×W×3 uint8 image."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * color_mask.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def save_png(array, path):
    """Write an H×W(×3) uint8 array as PNG atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(np.asarray(array)).save(tmp, format="PNG")
    return path
