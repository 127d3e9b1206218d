"""Your own images, with or without labels.

Layout, relative to ``data_dir`` (``dataset.dir_name``; without it ``data_dir`` itself)::

    <dir_name>/imgs/<split>/<stem>.<ext>
    <dir_name>/labels/<split>/<stem>.png or <stem>_gt.png   (optional: class ids, 255 void)

Labels pair with images by file stem. Without labels the classes are clusters to find
(``dataset.n_clusters``) and ``imgs/val`` is optional: the ``val`` split then shows the
training images (there is nothing to measure, only pictures to draw).
"""

from pathlib import Path

import numpy as np

from smooseg.data.labels import read_label_png
from smooseg.data.reader import SegmentationDataset, image_files
from smooseg.data.spec import DatasetSpec
from smooseg.errors import SmoosegError

# The label of image <stem>.<ext> is labels/<split>/<stem><suffix><label ext>.
LABEL_SUFFIXES = ("", "_gt")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".pgm")   # lossless: ids survive
IGNORE_ID = 255
TRAIN_SPLIT, VAL_SPLIT = "train", "val"


def _few(paths, limit=3):
    names = [Path(p).name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _index_by_stem(images, image_dir):
    by_stem = {}
    for image in images:
        if image.stem in by_stem:
            raise SmoosegError(
                f"directory: images {by_stem[image.stem].name} and {image.name} in {image_dir} share "
                f"the stem '{image.stem}', so their labels cannot be told apart; rename one")
        by_stem[image.stem] = image
    return by_stem


def _owner(label, by_stem):
    """The image a label file belongs to, or None."""
    if label.suffix.lower() not in LABEL_EXTENSIONS:
        return None
    stem = label.stem
    for suffix in LABEL_SUFFIXES:
        base = stem[: len(stem) - len(suffix)] if suffix else stem
        if (not suffix or stem.endswith(suffix)) and base in by_stem:
            return by_stem[base]
    return None


def pair_labels(images, labels, image_dir, label_dir):
    """The label of each image (same order), paired by file stem: image ``<stem>.<ext>`` takes
    ``<stem>.png`` or ``<stem>_gt.png`` (:data:`LABEL_SUFFIXES`, :data:`LABEL_EXTENSIONS`), never
    by sorted position. Images sharing a stem, an image with two labels, a label matching no
    image and an image without a label are SmoosegErrors naming the files."""
    by_stem = _index_by_stem(images, image_dir)
    label_of, unmatched = {}, []
    for label in labels:
        owner = _owner(label, by_stem)
        if owner is None:
            unmatched.append(label)
        elif owner in label_of:
            raise SmoosegError(
                f"directory: labels {label_of[owner].name} and {label.name} in {label_dir} both belong "
                f"to image {owner.name}; keep one")
        else:
            label_of[owner] = label
    unlabelled = [image for image in images if image not in label_of]
    if unmatched or unlabelled:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} label(s) match no image ({_few(unmatched)})")
        if unlabelled:
            problems.append(f"{len(unlabelled)} image(s) have no label ({_few(unlabelled)})")
        raise SmoosegError(
            f"directory: {len(images)} images in {image_dir} and {len(labels)} labels in {label_dir} "
            f"do not pair up: {' and '.join(problems)}; the label of image <stem>.<ext> is "
            f"<stem>.png or <stem>_gt.png ({'/'.join(LABEL_EXTENSIONS)}, lossless); add or rename "
            f"the labels, remove the extra files, or remove {label_dir} to use the images unlabelled")
    return [label_of[image] for image in images]


def image_folder(root, split):
    """The folder split ``split`` reads: ``imgs/<split>``; an unlabelled set without ``imgs/val``
    shows its training images for ``val``."""
    folder = root / "imgs" / split
    if split == VAL_SPLIT and not folder.is_dir() and not (root / "labels").is_dir():
        return root / "imgs" / TRAIN_SPLIT
    return folder


class DirectoryReader(SegmentationDataset):
    """A user's own images, optionally with label PNGs (ids 0..n_classes-1, 255 = ignore)."""

    exif = True          # own photos: read as segmentation and viewers show them
    label_check = "full"  # own data: every label decoded and its ids checked when the set is built

    @classmethod
    def list_items(cls, spec, root, split):
        image_dir, label_dir = image_folder(root, split), root / "labels" / split
        if not image_dir.is_dir():
            hint = ("" if split != VAL_SPLIT else
                    "; with labels the validation images and labels go in imgs/val and labels/val")
            raise SmoosegError(f"{spec.name}: image folder {image_dir} not found; put your images there "
                               f"or fix data_dir / dataset.dir_name{hint}; expected layout: {spec.layout}")
        images = image_files(image_dir)
        if not images:
            raise SmoosegError(f"directory: no images in {image_dir}; put .jpg/.png files there")
        if label_dir.is_dir():
            labels = pair_labels(images, image_files(label_dir), image_dir, label_dir)
        else:
            _index_by_stem(images, image_dir)
            labels = [None] * len(images)
        return [(image.stem, image, label) for image, label in zip(images, labels, strict=True)]

    def label_rule(self):
        return (f"a label is a single-channel PNG (mode L, P or I;16) of class ids 0..{self.n_classes - 1} "
                f"({IGNORE_ID} = ignore), the size of its image after EXIF orientation, named "
                "<image stem>.png or <image stem>_gt.png")

    def read_label(self, path):
        ids = read_label_png(path, self.label_rule())
        bad = np.setdiff1d(np.unique(ids), np.r_[np.arange(self.n_classes), IGNORE_ID])
        if bad.size:
            raise SmoosegError(
                f"label {path} holds class id {int(bad[0])} but n_classes={self.n_classes}; "
                f"{self.label_rule()}: fix the file or raise n_classes")
        return np.where(ids == IGNORE_ID, -1, ids)


DATASET_SPEC = DatasetSpec(
    name="directory",
    reader=DirectoryReader,
    layout="<data_dir>/<dir_name>/imgs/<split>/<stem>.<ext> and optionally "
           "<data_dir>/<dir_name>/labels/<split>/<stem>.png or <stem>_gt.png (single-channel "
           f"class ids, {IGNORE_ID} = ignore), paired by file stem; imgs/val is optional without labels",
    folder=None,
)
