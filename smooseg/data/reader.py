"""The reader every data set shares: a list of (name, image, label) entries and a joint transform.

Every reader yields ``dict(img=Float[3,H,W] normalised, label=Long[H,W] with -1 = ignore,
name=str)`` and offers ``load_raw(i) -> (PIL RGB image, int64 label array or None)`` at full
resolution (used by the crop writer). A data set's reader class (its spec's ``reader``) lists
its files with :meth:`SegmentationDataset.list_items` and may override how images and labels
are read.

Labels are checked when a reader is built, not when their batch is drawn (``label_check``):
``"header"`` checks every label file's header (single channel, the size of its image),
``"full"`` also decodes it and checks its ids. Images are read with their EXIF orientation
when ``exif`` (own photos, as segmentation reads them) and as stored for the official layouts,
whose annotations are drawn on the stored pixels.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from smooseg.data.labels import LABEL_RULE, label_header, read_label_png
from smooseg.data.spec import map_ids
from smooseg.errors import SmoosegError
from smooseg.io import IMAGE_EXTENSIONS, image_size, read_rgb

# Threads that check label files when a reader is built (file opening is I/O bound).
CHECK_THREADS = 8
CHECK_CHUNK = 256


def missing_error(spec_name, layout, what, path):
    """The one message about a data set file or folder that is not there."""
    return SmoosegError(
        f"{spec_name}: {what} {path} not found; download the data (download_datasets.py) or fix "
        f"data_dir; expected layout: {layout}")


def read_list(spec, path):
    """The ids of a split list (one a line; a UTF-8 byte-order mark and blank lines ignored)."""
    if not path.is_file():
        raise missing_error(spec.name, spec.layout, "split list", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SmoosegError(f"{spec.name}: split list {path} is not UTF-8 text ({err.reason}); it must "
                           "name one image id a line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise SmoosegError(f"{spec.name}: split list {path} is empty; it must name one image id a line")
    return ids


def check_exist(spec, list_path, paths):
    """Every file a split list names must exist."""
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise SmoosegError(
            f"{spec.name}: {list_path} names {len(absent)} file(s) that are missing, e.g. {absent[0]}; "
            f"re-download the data set or fix the list; expected layout: {spec.layout}")


def image_files(folder):
    """The image files of a folder (hidden files skipped), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def run_checks(check, items):
    """``check(*item)`` for every item, in threads; the first failure (in item order) is raised
    and the remaining checks are cancelled."""
    items = list(items)
    if not items:
        return
    chunks = [items[i:i + CHECK_CHUNK] for i in range(0, len(items), CHECK_CHUNK)]

    def check_chunk(chunk):
        for item in chunk:
            check(*item)

    if len(chunks) == 1:
        check_chunk(chunks[0])
        return
    executor = ThreadPoolExecutor(min(CHECK_THREADS, len(chunks)))
    try:
        for _ in executor.map(check_chunk, chunks):
            pass
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class SegmentationDataset(torch.utils.data.Dataset):
    """Common reader: a list of (name, image path, label path or None) plus a joint transform.

    Random crops use a ``torch.Generator`` seeded per item from (seed, epoch, index):
    reproducible whatever the number of DataLoader workers, and fresh every epoch. The epoch
    is ``set_epoch``'s, or travels with the index when a sampler asks for ``(index, epoch)``
    pairs (``epoch_items``; the training sampler does, so persistent workers see it too).
    """

    exif = False
    label_check = "header"

    def __init__(self, spec, entries, n_classes, transform, split, seed=0, class_names=None):
        self.spec = spec
        self.entries = list(entries)
        self.n_classes = int(n_classes)
        self.class_names = list(class_names or spec.class_names)
        self.transform = transform
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        self.check_labels()

    @classmethod
    def list_items(cls, spec, root, split):
        """The ``(name, image path, label path or None)`` entries of ``split`` under ``root``."""
        raise NotImplementedError

    @property
    def labelled(self):
        """Whether any item has a label (unlabelled sets train, but give no metric)."""
        return any(label is not None for _, _, label in self.entries)

    def label_rule(self):
        """What a label file of this data set must be (for messages)."""
        return LABEL_RULE

    def check_labels(self):
        """Check every label file against its image now (see :attr:`label_check`), so a bad one
        stops the run when the data set is built rather than when its batch is drawn."""
        if self.label_check is None:
            return
        pairs = [(image, label) for _, image, label in self.entries if label is not None]
        check = self.check_pair_full if self.label_check == "full" else self.check_pair_header
        run_checks(check, pairs)

    def image_size(self, path):
        """(width, height) of image ``path`` as :meth:`read_image` returns it, from its header."""
        return image_size(path, exif=self.exif)

    def check_pair_header(self, image_path, label_path):
        width, height = label_header(label_path, self.label_rule())
        self.check_size(image_path, label_path, self.image_size(image_path), (height, width))

    def check_pair_full(self, image_path, label_path):
        label = self.read_label(label_path)
        self.check_size(image_path, label_path, self.image_size(image_path), label.shape)

    def check_size(self, image_path, label_path, image_wh, label_shape):
        width, height = image_wh
        if tuple(label_shape) != (height, width):
            after = " (after its EXIF orientation)" if self.exif else ""
            raise SmoosegError(
                f"label {label_path} is {label_shape[0]}x{label_shape[1]} but image {image_path} "
                f"is {height}x{width}{after}; {self.label_rule()}")

    def __len__(self):
        return len(self.entries)

    def set_epoch(self, epoch):
        """Select the random crops of another epoch."""
        self.epoch = int(epoch)

    @property
    def epoch_items(self):
        """Whether items depend on the epoch (random crops): samplers then pass ``(index, epoch)``."""
        return self.transform.crop == "random"

    def item_name(self, index):
        return self.entries[index][0]

    def read_image(self, path):
        return read_rgb(path, exif=self.exif)

    def read_label(self, path):
        """Raw label ids mapped through the spec's table (class ids, -1 ignore)."""
        return map_ids(read_label_png(path, self.label_rule()), self.spec.label_table)

    def load_raw(self, index):
        """Full-resolution ``(PIL RGB image, int64 label H×W with -1 ignore, or None)``."""
        _, image_path, label_path = self.entries[index]
        image = self.read_image(image_path)
        if label_path is None:
            return image, None
        label = self.read_label(label_path)
        self.check_size(image_path, label_path, image.size, label.shape)
        return image, label

    def item_generator(self, index, epoch=None):
        """The ``torch.Generator`` for item ``index``'s random crop in ``epoch`` (default: set_epoch's)."""
        epoch = self.epoch if epoch is None else int(epoch)
        entropy = [self.seed % 2**64, epoch, int(index)]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & (2**63 - 1))

    def __getitem__(self, index):
        index, epoch = index if isinstance(index, tuple) else (index, None)
        image, label = self.load_raw(index)
        generator = self.item_generator(index, epoch) if self.transform.crop == "random" else None
        img, target = self.transform(image, label, generator=generator)
        return {"img": img, "label": target, "name": self.item_name(index)}
