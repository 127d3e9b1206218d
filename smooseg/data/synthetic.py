"""Small synthetic street scenes written in real on-disk layouts (for tests and the demo).

Each scene has sky on top, buildings and trees on the horizon, a sidewalk strip, the road at
the bottom, cars, pedestrians and poles; every class has its own colour and texture, and an
ego-vehicle band plus a random patch carry void labelIds. Everything is numpy and
deterministic from ``seed``.

* :func:`write_cityscapes_layout` — ``<root>/cityscapes/leftImg8bit/<split>/<city>/
  <name>_leftImg8bit.png`` and ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` with the
  official Cityscapes labelIds.
* :func:`write_directory_layout` — ``<root>/<name>/imgs/<split>/<name>.png`` and (optionally)
  ``labels/<split>/<name>.png`` with ids 0..5 (:data:`DIRECTORY_CLASSES`) and 255 = ignore.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from smooseg.io import atomic_write

# Official Cityscapes labelIds of the classes drawn.
UNLABELED, EGO_VEHICLE, ROAD, SIDEWALK, BUILDING = 0, 1, 7, 8, 11
POLE, VEGETATION, SKY, PERSON, CAR = 17, 21, 23, 24, 26

COLOURS = {
    UNLABELED: (0, 0, 0), EGO_VEHICLE: (20, 20, 20), ROAD: (95, 90, 100),
    SIDEWALK: (205, 175, 165), BUILDING: (150, 105, 70), POLE: (235, 235, 60),
    VEGETATION: (45, 145, 45), SKY: (115, 170, 240), PERSON: (220, 40, 200),
    CAR: (210, 35, 35),
}

DIRECTORY_CLASSES = ("road", "sidewalk", "building", "vegetation", "sky", "car")
_TO_DIRECTORY = {ROAD: 0, SIDEWALK: 1, BUILDING: 2, VEGETATION: 3, SKY: 4, CAR: 5}
CITIES = {"train": ("synthburg", "synthhausen"), "val": ("synthstadt",)}


def _layout(rng, h, w):
    """LabelId map of one street scene."""
    lab = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.35, 0.5))
    x = 0
    while x < w:
        width = int(rng.integers(max(2, w // 8), max(3, w // 3)))
        top = int(rng.integers(max(1, h // 10), max(2, horizon - 2)))
        lab[top:horizon, x:x + width] = VEGETATION if rng.random() < 0.3 else BUILDING
        x += width
    kerb = horizon + int((h - horizon) * rng.uniform(0.15, 0.3))
    lab[horizon:kerb] = SIDEWALK
    lab[kerb:] = ROAD
    for _ in range(int(rng.integers(0, 3))):
        px = int(rng.integers(0, w - 2))
        lab[int(rng.integers(h // 8, horizon)):kerb, px:px + 2] = POLE
    for _ in range(int(rng.integers(0, 3))):
        px, ph = int(rng.integers(0, w - 4)), int(rng.integers(h // 8, h // 4))
        lab[max(0, kerb - ph):kerb, px:px + max(3, w // 48)] = PERSON
    for _ in range(int(rng.integers(1, 4))):
        cw, ch = int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 10, h // 5))
        cx, cy = int(rng.integers(0, w - cw)), int(rng.integers(kerb, h - ch // 2))
        lab[max(0, cy - ch):cy, cx:cx + cw] = CAR
    lab[h - max(2, h // 16):] = EGO_VEHICLE
    uy, ux = int(rng.integers(0, h - h // 8)), int(rng.integers(0, w - w // 8))
    lab[uy:uy + h // 10, ux:ux + w // 10] = UNLABELED
    return lab


def _render(rng, lab):
    """RGB image of a labelId map: per-class colour plus a per-class texture."""
    h, w = lab.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), dtype=np.float32)
    for label_id, colour in COLOURS.items():
        img[lab == label_id] = colour
    shade = np.zeros((h, w), dtype=np.float32)
    coarse = rng.normal(0.0, 1.0, (h // 4 + 1, w // 4 + 1)).astype(np.float32)
    blotches = np.kron(coarse, np.ones((4, 4), dtype=np.float32))[:h, :w]
    windows = ((yy % 8 > 4) & (xx % 8 > 3)).astype(np.float32)
    tiles = ((yy % 6 < 1) | (xx % 6 < 1)).astype(np.float32)
    shade += (lab == VEGETATION) * 28.0 * blotches
    shade -= (lab == BUILDING) * 45.0 * windows
    shade -= (lab == SIDEWALK) * 35.0 * tiles
    shade += (lab == SKY) * (40.0 * yy / h - 20.0)
    img += shade[..., None]
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def street_scene(rng, size):
    """One scene as ``(image uint8 H×W×3, Cityscapes labelIds uint8 H×W)``."""
    lab = _layout(rng, int(size[0]), int(size[1]))
    return _render(rng, lab), lab


def to_directory_ids(label_ids):
    """Cityscapes labelIds -> directory class ids (0..5), other classes 255."""
    out = np.full(label_ids.shape, 255, dtype=np.uint8)
    for label_id, cls in _TO_DIRECTORY.items():
        out[label_ids == label_id] = cls
    return out


def _save_png(array, path):
    with atomic_write(path, durable=False) as tmp:  # one of many: not flushed one by one
        Image.fromarray(array).save(tmp, format="PNG")


def _scenes(seed, split, count, size):
    for i in range(count):
        rng = np.random.default_rng([int(seed), 0 if split == "train" else 1, i])
        yield i, street_scene(rng, size)


def write_cityscapes_layout(root, n_train=8, n_val=4, size=(96, 192), seed=0):
    """Write scenes in the official Cityscapes layout under ``root``; returns ``root``."""
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        cities = CITIES[split]
        for i, (image, lab) in _scenes(seed, split, count, size):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_{19 + i:06d}"
            _save_png(image, root / "cityscapes" / "leftImg8bit" / split / city
                      / f"{name}_leftImg8bit.png")
            _save_png(lab, root / "cityscapes" / "gtFine" / split / city
                      / f"{name}_gtFine_labelIds.png")
    return root


def write_directory_layout(root, name="mydata", n_train=8, n_val=4, size=(96, 96),
                           with_labels=True, seed=0):
    """Write scenes as a directory data set ``<root>/<name>``; returns ``root`` (data_dir).

    Read it back with ``build_dataset("directory", root, split, res, n_classes=6,
    dir_name=name)``.
    """
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        for i, (image, lab) in _scenes(seed, split, count, size):
            _save_png(image, root / name / "imgs" / split / f"scene_{i:04d}.png")
            if with_labels:
                _save_png(to_directory_ids(lab), root / name / "labels" / split
                          / f"scene_{i:04d}.png")
    return root
