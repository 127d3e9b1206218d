"""Pre-cropped training sets as stored on disk: folder naming, completion record, the reader.

A set lives in ``<data_dir>/cropped/<key>_<crop_type>_crop_<ratio>/`` (:func:`crop_folder`, the
one place the path is built; ``key`` is the data set's :meth:`DatasetSpec.crop_key`) and holds
``img/<split>/<item>_<n>.jpg`` and ``label/<split>/<item>_<n>.png`` (label + 1, 0 = ignore):
crop ``n`` (0-4) of the source item named ``<item>``, so adding or removing a source image
never renames the crops of another.

``complete.json`` (:data:`CROP_RECORD`) holds the settings and, per finished split, its source
listing: every item's name with the byte sizes of its image and label. The reader refuses a
split without its entry, whose files disagree with it, or whose source no longer matches it
(images added, removed or replaced), naming the ``crop_datasets.py`` command that brings it up
to date.
"""

import json
import os
import re
from pathlib import Path

from smooseg.data.labels import read_label_png
from smooseg.data.reader import SegmentationDataset
from smooseg.errors import SmoosegError

CROP_RECORD = "complete.json"
CROP_RECORD_FORMAT = 2
CROP_TYPES = ("five", "random")
CROPS_PER_IMAGE = 5
_CROP_NAME = re.compile(r"^(?P<item>.+)_(?P<n>\d)$")


def crop_dir_name(key, crop_type, ratio):
    """Folder name of a pre-cropped set, e.g. ``cityscapes_five_crop_0.5``."""
    return f"{key}_{crop_type}_crop_{float(ratio)}"


def crop_folder(data_dir, key, crop_type, ratio):
    """Root of a cropped set: ``<data_dir>/cropped/<key>_<crop_type>_crop_<ratio>``."""
    return Path(data_dir) / "cropped" / crop_dir_name(key, crop_type, ratio)


def crop_name(item, n):
    """File stem of crop ``n`` of source item ``item``."""
    return f"{item}_{n}"


def crop_item(stem):
    """The source item of a crop file stem, or None when the stem is not a crop's."""
    match = _CROP_NAME.match(stem)
    return match.group("item") if match and int(match.group("n")) < CROPS_PER_IMAGE else None


def split_files(folder, split, sub, suffix):
    """Stems of the finished ``<stem><suffix>`` files of ``<folder>/<sub>/<split>`` (temp files skipped)."""
    path = Path(folder) / sub / split
    if not path.is_dir():
        return set()
    return {name[: -len(suffix)] for name in os.listdir(path)
            if name.endswith(suffix) and not name.startswith(".")}


def source_listing(entries):
    """``{item name: [image bytes, label bytes or None]}`` of reader entries: what identifies the
    source a split was cut from. Item names must be distinct."""
    listing = {}
    for name, image, label in entries:
        if not name or name.startswith(".") or "/" in name or os.sep in name:
            raise SmoosegError(f"source image {image} has the name '{name}', which cannot name a crop file "
                               "(empty, hidden or holding a path separator); fix its id in the split list")
        if name in listing:
            raise SmoosegError(f"two source images are both named '{name}' ({image}); crops are named "
                               "after their source, so rename one")
        listing[name] = [os.stat(image).st_size, None if label is None else os.stat(label).st_size]
    return listing


def listing_changes(recorded, current):
    """Plain words for how a source listing differs from the recorded one ('' when it does not)."""
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(n for n in set(recorded) & set(current) if list(recorded[n]) != list(current[n]))
    parts = [f"{len(names)} {what} (e.g. {names[0]})"
             for what, names in (("added", added), ("removed", removed), ("replaced", changed)) if names]
    return ", ".join(parts)


def crop_command(data_dir, spec, crop_type, ratio, split="train", dir_name=None, n_classes=None,
                 seed=None):
    """The ``crop_datasets.py`` command that writes, finishes or updates the cropped set of
    ``spec``: the one command every message about a missing, incomplete or stale set names."""
    words = ["python crop_datasets.py", f"data_dir={data_dir}", f"datasets=[{spec.name}]",
             f"crop_types=[{crop_type}]", f"crop_ratio={ratio}"]
    if split != "train":
        words.append(f"splits=[{split}]")
    if seed not in (None, 0):
        words.append(f"seed={seed}")
    if spec.folder is None:
        words += [f"dir_dataset_name={dir_name}", f"dir_dataset_n_classes={n_classes}"]
    return " ".join(words)


def crop_set_error(folder, problem, command, verb="finish"):
    """The one message about a cropped training set that cannot be read: the folder, what is wrong
    with it, the ``crop_datasets.py`` command that writes or finishes it, and the raw-image option."""
    return SmoosegError(f"the cropped training set {folder} {problem}; {verb} it with `{command}`, or "
                        "train on the raw images with dataset.train_crop_source=null")


def read_crop_record(folder):
    """The completion record of a cropped set folder (dict), or None when absent or unreadable."""
    try:
        record = json.loads((Path(folder) / CROP_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("splits"), dict) else None


def _split_entry(root, record, split, command):
    if record is not None and record.get("format") != CROP_RECORD_FORMAT:
        raise crop_set_error(root, f"was written by an earlier version (record format "
                                   f"{record.get('format')}, crops numbered by position); delete it",
                             command, verb="then write")
    entry = (record or {}).get("splits", {}).get(split)
    if entry is None:
        why = (f"has no completion record {CROP_RECORD}" if record is None
               else f"has no completion entry for split {split} in {CROP_RECORD}")
        raise crop_set_error(root, f"is incomplete: it {why} (a crop run was interrupted or is "
                                   "still running)", command)
    return entry


class CroppedDataset(SegmentationDataset):
    """Pre-cropped training set written by ``crop_datasets.py`` (labels stored + 1).

    Read only when complete and current: its record must list ``split`` with exactly the crops
    on disk, and ``source`` (the entries of the source split, None when the source is not on
    this machine) must match the listing the crops were cut from.
    """

    label_check = None  # written by crop_datasets.py from checked labels; the record vouches for it

    def __init__(self, spec, root, split, n_classes, transform, seed=0, command=None, source=None,
                 class_names=None):
        root = Path(root)
        image_dir, label_dir = root / "img" / split, root / "label" / split
        for folder in (root, image_dir, label_dir):
            if not folder.is_dir():
                raise crop_set_error(folder, "does not exist", command, verb="write")
        entry = _split_entry(root, read_crop_record(root), split, command)
        items = list(entry.get("items") or {})
        if source is not None:
            changes = listing_changes(entry.get("items") or {}, source_listing(source))
            if changes:
                raise crop_set_error(root, f"is stale: its source images changed since it was cut "
                                           f"({changes})", command, verb="update")
        expected = {crop_name(item, n) for item in items for n in range(CROPS_PER_IMAGE)}
        images = split_files(root, split, "img", ".jpg")
        labels = split_files(root, split, "label", ".png")
        if images != expected or labels != expected:
            raise crop_set_error(root, f"does not match its completion record: img/{split} holds "
                                       f"{len(images)} crops and label/{split} {len(labels)} but "
                                       f"{CROP_RECORD} lists {len(expected)}", command)
        entries = [(crop_name(item, n), image_dir / f"{crop_name(item, n)}.jpg",
                    label_dir / f"{crop_name(item, n)}.png")
                   for item in items for n in range(CROPS_PER_IMAGE)]
        super().__init__(spec, entries, n_classes, transform, split, seed, class_names=class_names)

    def read_label(self, path):
        stored = read_label_png(path)
        bad = stored[(stored < 0) | (stored > self.n_classes)]
        if bad.size:
            raise SmoosegError(f"cropped label {path} holds {int(bad[0]) - 1} but n_classes="
                               f"{self.n_classes}; delete the crop folder and run crop_datasets.py")
        return stored - 1
