"""What a data set is: :class:`DatasetSpec`, one per data set (``smooseg/data/sets/<name>.py``).

A spec declares every fact about its data set once: its name, its classes with their names and
colours, how raw label ids map to classes, its default evaluation resolution, where it lives
under ``data_dir`` and how it is read (its reader class), its splits, the archives that
``download_datasets.py`` fetches for it, and the name of its pre-cropped folders. Code elsewhere
asks the spec (:func:`smooseg.data.registry.dataset_spec`) and never tests a data set's name.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Evaluation resolution of a data set that does not declare its own (the reference's 320).
DEFAULT_EVAL_RES = 320
# Raw label ids a lookup table covers (8-bit label files); others become ignore (-1).
LABEL_ID_RANGE = 256


def pascal_colors(n):
    """The first ``n`` colours of the Pascal VOC bit-interleaving palette, black skipped."""
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


def lookup_table(mapping):
    """A :data:`LABEL_ID_RANGE`-entry int64 table from ``{raw id: class}``; unlisted ids are -1."""
    table = np.full(LABEL_ID_RANGE, -1, dtype=np.int64)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table


def map_ids(ids, table):
    """Map an integer id array through a lookup table; ids outside the table become -1."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.full(ids.shape, -1, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(table))
    out[inside] = table[ids[inside]]
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """One data set, declared once.

    ``classes`` pairs each class name with its RGB colour, in class-id order; empty for a set
    whose classes the user counts (``directory``: ``dataset.n_classes`` / ``dataset.n_clusters``).
    ``label_table`` maps raw label ids to class ids (None: the ids are the classes, checked
    against the count). ``folder`` is the set's folder under ``data_dir`` (None: the user names
    it, ``dataset.dir_name``). ``splits`` maps each accepted split name to the native parts it
    reads (None: any sub-folder name). ``archives`` are the stems of the ``<stem>.zip`` files
    the reference release hosts for it. ``aliases`` are other names checkpoints use for it.
    """

    name: str
    reader: type
    layout: str
    folder: str | None
    classes: tuple = ()
    label_table: np.ndarray | None = field(default=None, compare=False, repr=False)
    splits: dict | None = None
    eval_res: int = DEFAULT_EVAL_RES
    archives: tuple = ()
    aliases: tuple = ()
    train_unlabelled_split: str | None = None  # split read with dataset.train_unlabelled=true

    @property
    def class_names(self):
        return tuple(name for name, _ in self.classes)

    @property
    def colors(self):
        return tuple(tuple(color) for _, color in self.classes)

    @property
    def n_classes(self):
        """The number of classes, or None when the user gives it."""
        return len(self.classes) or None

    def root(self, data_dir, dir_name=None):
        """The set's own folder: ``<data_dir>/<folder>`` (user-named sets: ``<data_dir>/<dir_name>``,
        or ``data_dir`` itself without one)."""
        folder = self.folder if self.folder is not None else dir_name
        return Path(data_dir) / folder if folder else Path(data_dir)

    def crop_key(self, dir_name=None):
        """The name of this set in its cropped folders (user-named sets: their folder name)."""
        return self.name if self.folder is not None else (dir_name or self.name)

    def native_splits(self, split):
        """The native parts split ``split`` reads, or None when the spec does not know it."""
        if self.splits is None:
            return (split,)
        return self.splits.get(split)
