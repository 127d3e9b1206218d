"""Data set readers (docs/method.md §7): cocostuff27, cityscapes, potsdam, directory and cropped sets.

Every reader yields ``dict(img=Float[3,H,W] normalised, label=Long[H,W] with -1 = ignore,
name=str)`` and offers ``load_raw(i) -> (PIL RGB image, int64 label array or None)`` at full
resolution (used by the crop writer). On-disk layouts, relative to ``data_dir``::

    cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt     (train ids, one a line)
    cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt     (val ids)
    cocostuff/images/{train2017,val2017}/<id>.jpg
    cocostuff/annotations/{train2017,val2017}/<id>.png            (fine ids 0-181, 255 void)
    cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
    potsdam/imgs/<id>.mat  (key img)    potsdam/gt/<id>.mat  (key gt)
    potsdam/{labelled_train,unlabelled_train,labelled_test,all}.txt
    <dir_name>/imgs/<split>/<stem>.<ext>  <dir_name>/labels/<split>/<stem>.png or <stem>_gt.png
                                          (class ids, 255 void; paired by stem)
    cropped/<dataset>_<crop_type>_crop_<ratio>/img/<split>/<n>.jpg
    cropped/<dataset>_<crop_type>_crop_<ratio>/label/<split>/<n>.png   (label + 1, 0 = ignore)
    cropped/<dataset>_<crop_type>_crop_<ratio>/complete.json           (written last by crop_datasets.py)

Labels are checked when a reader is built, not when their batch is drawn: directory sets fully
(every label decoded: single channel, ids in range, the size of its image), the official layouts
from the file headers (single channel, the size of its image; their ids all map to a class or
to ignore), Potsdam from the ``.mat`` headers; a cropped set by its completion record.
Images are read with EXIF orientation applied for own data (directory sets, as segmentation
reads them) and as stored for the official layouts, whose annotations are drawn on the stored
pixels (the reference reads them so too).

Splits: ``train``/``val`` map to each data set's own names (cocostuff train2017/val2017;
potsdam train = labelled_train as in the reference, ``train+unlabelled`` = unlabelled_train +
labelled_train, val = labelled_test); the native names are accepted too.
"""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.io
import torch
from PIL import Image

from smooseg.data.transforms import JointTransform
from smooseg.errors import SmoosegError
from smooseg.io import IMAGE_EXTENSIONS, image_size, read_rgb, to_uint8

COCO_COARSE = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)

# COCO-Stuff fine classes in label-PNG order (PNG value = official 1-based id - 1), each with
# its coarse class (the COCO / COCO-Stuff supercategory). Things 0-90, stuff 91-181. The 11
# things marked "removed" were dropped from COCO and never appear in annotations; like the
# reference they still map to their supercategory.
COCO_FINE = (
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"),  # 0-2
    ("motorcycle", "vehicle"), ("airplane", "vehicle"), ("bus", "vehicle"),  # 3-5
    ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),  # 6-8
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"),  # 9-10
    ("street sign", "outdoor"),  # 11 removed
    ("stop sign", "outdoor"), ("parking meter", "outdoor"), ("bench", "outdoor"),  # 12-14
    ("bird", "animal"), ("cat", "animal"), ("dog", "animal"), ("horse", "animal"),  # 15-18
    ("sheep", "animal"), ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"),  # 19-22
    ("zebra", "animal"), ("giraffe", "animal"),  # 23-24
    ("hat", "accessory"),  # 25 removed
    ("backpack", "accessory"), ("umbrella", "accessory"),  # 26-27
    ("shoe", "accessory"), ("eye glasses", "accessory"),  # 28-29 removed
    ("handbag", "accessory"), ("tie", "accessory"), ("suitcase", "accessory"),  # 30-32
    ("frisbee", "sports"), ("skis", "sports"), ("snowboard", "sports"),  # 33-35
    ("sports ball", "sports"), ("kite", "sports"), ("baseball bat", "sports"),  # 36-38
    ("baseball glove", "sports"), ("skateboard", "sports"), ("surfboard", "sports"),  # 39-41
    ("tennis racket", "sports"),  # 42
    ("bottle", "kitchen"),  # 43
    ("plate", "kitchen"),  # 44 removed
    ("wine glass", "kitchen"), ("cup", "kitchen"), ("fork", "kitchen"),  # 45-47
    ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),  # 48-50
    ("banana", "food"), ("apple", "food"), ("sandwich", "food"), ("orange", "food"),  # 51-54
    ("broccoli", "food"), ("carrot", "food"), ("hot dog", "food"), ("pizza", "food"),  # 55-58
    ("donut", "food"), ("cake", "food"),  # 59-60
    ("chair", "furniture"), ("couch", "furniture"), ("potted plant", "furniture"),  # 61-63
    ("bed", "furniture"),  # 64
    ("mirror", "furniture"),  # 65 removed
    ("dining table", "furniture"),  # 66
    ("window", "furniture"), ("desk", "furniture"),  # 67-68 removed
    ("toilet", "furniture"),  # 69
    ("door", "furniture"),  # 70 removed
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"),  # 71-73
    ("remote", "electronic"), ("keyboard", "electronic"), ("cell phone", "electronic"),  # 74-76
    ("microwave", "appliance"), ("oven", "appliance"), ("toaster", "appliance"),  # 77-79
    ("sink", "appliance"), ("refrigerator", "appliance"),  # 80-81
    ("blender", "appliance"),  # 82 removed
    ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"), ("scissors", "indoor"),  # 83-86
    ("teddy bear", "indoor"), ("hair drier", "indoor"), ("toothbrush", "indoor"),  # 87-89
    ("hair brush", "indoor"),  # 90 removed
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"),  # 91-93
    ("bridge", "building"), ("building-other", "building"), ("bush", "plant"),  # 94-96
    ("cabinet", "furniture-stuff"), ("cage", "structural"),  # 97-98
    ("cardboard", "rawmaterial"), ("carpet", "floor"),  # 99-100
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"),  # 101-102
    ("cloth", "textile"), ("clothes", "textile"), ("clouds", "sky"),  # 103-105
    ("counter", "furniture-stuff"), ("cupboard", "furniture-stuff"),  # 106-107
    ("curtain", "textile"), ("desk-stuff", "furniture-stuff"), ("dirt", "ground"),  # 108-110
    ("door-stuff", "furniture-stuff"), ("fence", "structural"),  # 111-112
    ("floor-marble", "floor"), ("floor-other", "floor"), ("floor-stone", "floor"),  # 113-115
    ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"),  # 116-118
    ("fog", "water"), ("food-other", "food-stuff"), ("fruit", "food-stuff"),  # 119-121
    ("furniture-other", "furniture-stuff"), ("grass", "plant"),  # 122-123
    ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),  # 124-126
    ("house", "building"), ("leaves", "plant"), ("light", "furniture-stuff"),  # 127-129
    ("mat", "textile"), ("metal", "rawmaterial"),  # 130-131
    ("mirror-stuff", "furniture-stuff"), ("moss", "plant"),  # 132-133
    ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"),  # 134-136
    ("net", "structural"), ("paper", "rawmaterial"), ("pavement", "ground"),  # 137-139
    ("pillow", "textile"), ("plant-other", "plant"), ("plastic", "rawmaterial"),  # 140-142
    ("platform", "ground"), ("playingfield", "ground"), ("railing", "structural"),  # 143-145
    ("railroad", "ground"), ("river", "water"), ("road", "ground"),  # 146-148
    ("rock", "solid"), ("roof", "building"), ("rug", "textile"),  # 149-151
    ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"),  # 152-154
    ("shelf", "furniture-stuff"), ("sky-other", "sky"), ("skyscraper", "building"),  # 155-157
    ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),  # 158-160
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),  # 161-163
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"),  # 164-166
    ("towel", "textile"), ("tree", "plant"), ("vegetable", "food-stuff"),  # 167-169
    ("wall-brick", "wall"), ("wall-concrete", "wall"), ("wall-other", "wall"),  # 170-172
    ("wall-panel", "wall"), ("wall-stone", "wall"), ("wall-tile", "wall"),  # 173-175
    ("wall-wood", "wall"), ("water-other", "water"), ("waterdrops", "water"),  # 176-178
    ("window-blind", "window"), ("window-other", "window"), ("wood", "solid"),  # 179-181
)
COCO_FINE_TO_COARSE = {fine: COCO_COARSE.index(coarse)
                       for fine, (_, coarse) in enumerate(COCO_FINE)}

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_FIRST_ID = 7  # labelIds 7..33 are the 27 classes; smaller ids (and 255) are void

POTSDAM_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")
# Potsdam-3 merges the six ISPRS ids: 0 road + 4 car, 1 building + 5 clutter, 2 + 3 vegetation.
POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}

N_CLASSES = {"cocostuff27": 27, "cityscapes": 27, "potsdam": 3}
CLASS_NAMES = {
    "cocostuff27": list(COCO_COARSE),
    "cityscapes": list(CITYSCAPES_CLASSES),
    "potsdam": list(POTSDAM_CLASSES),
}
DATASETS = ("cocostuff27", "cityscapes", "potsdam", "directory")

EXPECTED_LAYOUT = {
    "cocostuff27": "<data_dir>/cocostuff/images/<train2017|val2017>/<id>.jpg, "
                   "<data_dir>/cocostuff/annotations/<train2017|val2017>/<id>.png and the lists "
                   "<data_dir>/cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt, "
                   "<data_dir>/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
    "cityscapes": "<data_dir>/cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
                  "<data_dir>/cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png",
    "potsdam": "<data_dir>/potsdam/imgs/<id>.mat (key img), <data_dir>/potsdam/gt/<id>.mat "
               "(key gt) and the lists <data_dir>/potsdam/"
               "{labelled_train,unlabelled_train,labelled_test,all}.txt",
    "directory": "<data_dir>/<dir_name>/imgs/<split>/<stem>.<ext> and optionally "
                 "<data_dir>/<dir_name>/labels/<split>/<stem>.png or <stem>_gt.png (single-channel "
                 "class ids, 255 = ignore), paired by file stem",
    "cropped": "<data_dir>/cropped/<dataset>_<crop_type>_crop_<ratio>/img/<split>/<n>.jpg, "
               ".../label/<split>/<n>.png and .../complete.json, written by crop_datasets.py",
}

# Directory sets: the label of image <stem>.<ext> is labels/<split>/<stem><suffix><label ext>.
LABEL_SUFFIXES = ("", "_gt")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".pgm")   # lossless: ids survive
# Threads that check label files when a reader is built (file opening is I/O bound).
CHECK_THREADS = 8
CHECK_CHUNK = 256
# Written last by crop_datasets.py in every cropped set folder: settings and per-split counts.
CROP_RECORD = "complete.json"
CROP_RECORD_FORMAT = 1

COCO_LISTS = {"train2017": "Coco164kFull_Stuff_Coarse.txt",
              "val2017": "Coco164kFull_Stuff_Coarse_7.txt"}
COCO_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017",
               "val2017": "val2017"}
POTSDAM_SPLITS = {
    "train": ("labelled_train",),
    "train+unlabelled": ("unlabelled_train", "labelled_train"),
    "val": ("labelled_test",),
    "train+val": ("unlabelled_train", "labelled_train", "labelled_test"),
    "labelled_train": ("labelled_train",),
    "unlabelled_train": ("unlabelled_train",),
    "labelled_test": ("labelled_test",),
    "all": ("all",),
}
CITYSCAPES_SPLITS = ("train", "val", "test")


def _lookup_table(mapping):
    table = np.full(256, -1, dtype=np.int64)
    for fine, coarse in mapping.items():
        table[fine] = coarse
    return table


# Ids outside a table (COCO 182-254, Potsdam 6-254, Cityscapes 0-6 and 34-255) become -1.
COCO_TABLE = _lookup_table(COCO_FINE_TO_COARSE)
CITYSCAPES_TABLE = _lookup_table({i: i - CITYSCAPES_FIRST_ID for i in range(7, 34)})
POTSDAM_TABLE = _lookup_table(POTSDAM_FINE_TO_COARSE)


def map_ids(ids, table):
    """Map an integer id array through a 256-entry table; ids outside 0..255 become -1."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.full(ids.shape, -1, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(table))
    out[inside] = table[ids[inside]]
    return out


def class_names(name, n_classes=None):
    """Class names of a data set when it has them (and their count is ``n_classes``), else
    ``class_0 .. class_{n-1}`` (directory sets, or another class count)."""
    names = CLASS_NAMES.get(name)
    if names is not None and (n_classes is None or len(names) == int(n_classes)):
        return list(names)
    return [f"class_{i}" for i in range(int(n_classes))]


def n_classes_of(name, n_classes=None, key="dataset.n_classes"):
    """The number of classes of data set ``name``; ``n_classes`` (the config value ``key``) is
    required for directory sets and must agree with a known data set's own count."""
    if name == "directory":
        if n_classes is None or int(n_classes) < 1:
            raise SmoosegError(f"{key} is not set; a directory data set needs n_classes (the number of "
                               f"classes in your data), e.g. {key}=5")
        return int(n_classes)
    if name not in N_CLASSES:
        raise SmoosegError(f"unknown data set '{name}' (dataset.name={name}); choose one of {', '.join(DATASETS)}")
    if n_classes is not None and int(n_classes) != N_CLASSES[name]:
        raise SmoosegError(f"{name} has {N_CLASSES[name]} classes, not {key}={n_classes}; drop the override")
    return N_CLASSES[name]


@dataclass
class DatasetInfo:
    """The data set a model was trained for: its classes, and how its images were read and
    validated (what evaluation defaults to)."""

    n_classes: int
    name: str = "directory"
    class_names: Optional[list] = None  # None: :func:`class_names`
    dir_name: Optional[str] = None      # directory sets: the folder under data_dir
    eval_res: Optional[int] = None      # evaluation resolution (None: 320, potsdam 224)
    image_interp: str = "nearest"

    def __post_init__(self):
        self.n_classes = int(self.n_classes)
        self.class_names = list(self.class_names or class_names(self.name, self.n_classes))

    def to_dict(self):
        return {"n_classes": self.n_classes, "name": self.name, "class_names": list(self.class_names),
                "dir_name": self.dir_name, "eval_res": self.eval_res, "image_interp": self.image_interp}


def crop_dir_name(dataset, crop_type, ratio):
    """Folder name of a pre-cropped set, e.g. ``cityscapes_five_crop_0.5``."""
    return f"{dataset}_{crop_type}_crop_{float(ratio)}"


def crop_command(data_dir, name, crop_type, ratio, split="train", dir_name=None, n_classes=None,
                 seed=None):
    """The ``crop_datasets.py`` command that writes (or finishes) the cropped set of data set
    ``name``: the one command every message about a missing or incomplete cropped set names."""
    words = ["python crop_datasets.py", f"data_dir={data_dir}", f"datasets=[{name}]",
             f"crop_types=[{crop_type}]", f"crop_ratio={ratio}"]
    if split != "train":
        words.append(f"splits=[{split}]")
    if seed not in (None, 0):
        words.append(f"seed={seed}")
    if name == "directory":
        words += [f"dir_dataset_name={dir_name}", f"dir_dataset_n_classes={n_classes}"]
    return " ".join(words)


def read_crop_record(folder):
    """The completion record of a cropped set folder (dict), or None when absent or unreadable."""
    try:
        record = json.loads((Path(folder) / CROP_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("splits"), dict) else None


def _missing(name, what, path):
    return SmoosegError(
        f"{name}: {what} {path} not found; download the data (download_datasets.py) or fix "
        f"data_dir; expected layout: {EXPECTED_LAYOUT[name]}")


LABEL_RULE = "a label file is a single-channel image of class ids (mode L, P or I;16), the size of its image"


def single_channel(mode):
    """Whether a PIL mode holds one integer channel (a label map), not colours."""
    return mode in ("L", "P", "1", "I") or mode.startswith("I;16")


def _bad_mode(path, mode, rule):
    return SmoosegError(f"label {path} has mode {mode}, not a single-channel id map; {rule}; save "
                        "the class ids as a greyscale (mode L) PNG")


def _unreadable_label(path, err):
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    return SmoosegError(f"cannot read label {path} ({reason}); the file is corrupt: "
                        "re-download it or remove it from the data set")


def label_header(path, rule=LABEL_RULE):
    """(width, height) of a label file from its header; SmoosegError unless it is single-channel."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _unreadable_label(path, err) from None
    if not single_channel(mode):
        raise _bad_mode(path, mode, rule)
    return size


def read_label_png(path, rule=LABEL_RULE):
    """Read a single-channel label image as an int64 array of its raw ids."""
    try:
        with Image.open(path) as im:
            im.load()
            if not single_channel(im.mode):
                raise _bad_mode(path, im.mode, rule)
            return np.asarray(im).astype(np.int64)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _unreadable_label(path, err) from None


def _mat_contents(path, key, read):
    """``read(path)`` as a dict of arrays (or shapes) holding ``key``; one-line errors naming the file."""
    try:
        contents = read(path)
    except Exception as err:  # scipy raises several unrelated types for broken files
        raise SmoosegError(f"cannot read {path} ({type(err).__name__}: {err}); the file is "
                           f"corrupt: re-download it or remove its id from the split list"
                           ) from None
    if key not in contents:
        raise SmoosegError(f"{path} has no '{key}' array; Potsdam .mat files hold 'img' "
                           f"(images) or 'gt' (labels)")
    return contents[key]


def mat_shape(path, key):
    """Shape of array ``key`` in a MATLAB ``.mat`` file, from its header (the data is not read)."""
    return _mat_contents(path, key, lambda p: {name: tuple(shape) for name, shape, _ in scipy.io.whosmat(p)})


def read_mat(path, key):
    """Read array ``key`` from a MATLAB ``.mat`` file."""
    return np.asarray(_mat_contents(path, key, scipy.io.loadmat))


def potsdam_image(array, path):
    """First three channels of a Potsdam ``img`` array as uint8 RGB, scaled by bit depth
    (:func:`smooseg.io.to_uint8`: floats in [0, 1] x255, 16-bit integers /257)."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise SmoosegError(f"{path}: 'img' has shape {array.shape}; expected H x W x >=3 (RGB)")
    return to_uint8(array[..., :3])


def _image_files(folder):
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _few(paths, limit=3):
    names = [Path(p).name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def pair_labels(images, labels, image_dir, label_dir):
    """The label of each image (same order), paired by file stem: image ``<stem>.<ext>`` takes
    ``<stem>.png`` or ``<stem>_gt.png`` (:data:`LABEL_SUFFIXES`, :data:`LABEL_EXTENSIONS`), never
    by sorted position. Images sharing a stem, an image with two labels, a label matching no
    image and an image without a label are SmoosegErrors naming the files."""
    by_stem = {}
    for image in images:
        if image.stem in by_stem:
            raise SmoosegError(
                f"directory: images {by_stem[image.stem].name} and {image.name} in {image_dir} share "
                f"the stem '{image.stem}', so their labels cannot be told apart; rename one")
        by_stem[image.stem] = image
    label_of, unmatched = {}, []
    for label in labels:
        stem = label.stem
        owner = None
        if label.suffix.lower() in LABEL_EXTENSIONS:
            for suffix in LABEL_SUFFIXES:
                base = stem[: len(stem) - len(suffix)] if suffix else stem
                if (not suffix or stem.endswith(suffix)) and base in by_stem:
                    owner = by_stem[base]
                    break
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


def _numbered(folder, suffix):
    """Numbers n of the finished files ``<n><suffix>`` in a folder (temp files skipped)."""
    pattern = re.compile(r"^(\d+)" + re.escape(suffix) + "$")
    return {int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m}


def _read_list(name, path):
    if not path.is_file():
        raise _missing(name, "split list", path)
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise SmoosegError(f"{name}: split list {path} is empty; it must name one image id a line")
    return ids


def _check_exist(name, list_path, paths):
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise SmoosegError(
            f"{name}: {list_path} names {len(absent)} file(s) that are missing, e.g. {absent[0]}; "
            f"re-download the data set or fix the list; expected layout: {EXPECTED_LAYOUT[name]}")


class SegmentationDataset(torch.utils.data.Dataset):
    """Common reader: a list of (name, image path, label path or None) plus a joint transform.

    Random crops use a ``torch.Generator`` seeded per item from (seed, epoch, index):
    reproducible whatever the number of DataLoader workers, and fresh every epoch. The epoch
    is ``set_epoch``'s, or travels with the index when a sampler asks for ``(index, epoch)``
    pairs (``epoch_items``; the training sampler does, so persistent workers see it too).
    """

    key = "dataset"
    # Images are read with their EXIF orientation (own photos; segmentation reads them so too);
    # the official layouts set False: their annotations are drawn on the stored pixels.
    exif = True
    # What is checked of every label file when the reader is built: "header" (single channel,
    # the size of its image, from the file headers), "full" (also every id) or None.
    label_check = "header"

    def __init__(self, entries, n_classes, names_of_classes, transform, split, seed=0):
        self.entries = list(entries)
        self.n_classes = int(n_classes)
        self.class_names = list(names_of_classes)
        self.transform = transform
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        self.check_labels()

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
        raise NotImplementedError

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


class CocoStuff27(SegmentationDataset):
    """COCO-Stuff 164k curated lists, 182 fine ids mapped to 27 coarse classes."""

    key = "cocostuff27"
    exif = False  # COCO-Stuff's annotations are drawn on the stored pixels

    def __init__(self, data_dir, split, transform, seed=0):
        if split not in COCO_SPLITS:
            raise SmoosegError(f"cocostuff27: unknown split '{split}'; use train or val")
        native = COCO_SPLITS[split]
        root = Path(data_dir) / "cocostuff"
        if not root.is_dir():
            raise _missing(self.key, "folder", root)
        list_path = root / "curated" / native / COCO_LISTS[native]
        ids = _read_list(self.key, list_path)
        images = [root / "images" / native / f"{i}.jpg" for i in ids]
        labels = [root / "annotations" / native / f"{i}.png" for i in ids]
        _check_exist(self.key, list_path, images + labels)
        super().__init__(zip(ids, images, labels), 27, COCO_COARSE, transform, split, seed)

    def label_rule(self):
        return ("a COCO-Stuff label is the single-channel annotations/<split>/<id>.png of fine ids "
                "(0-181, 255 = void), the size of its image")

    def read_label(self, path):
        return map_ids(read_label_png(path, self.label_rule()), COCO_TABLE)


class Cityscapes(SegmentationDataset):
    """Official Cityscapes fine annotations; class = labelId - 7, labelIds < 7 ignored."""

    key = "cityscapes"
    exif = False  # the official annotations are drawn on the stored pixels

    def __init__(self, data_dir, split, transform, seed=0):
        if split not in CITYSCAPES_SPLITS:
            raise SmoosegError(f"cityscapes: unknown split '{split}'; use train, val or test")
        root = Path(data_dir) / "cityscapes"
        image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (root, image_root, label_root):
            if not folder.is_dir():
                raise _missing(self.key, "folder", folder)
        images = sorted(image_root.glob("*/*_leftImg8bit.png"))
        labels = sorted(label_root.glob("*/*_gtFine_labelIds.png"))
        if not images:
            raise SmoosegError(f"cityscapes: no *_leftImg8bit.png images under {image_root}; "
                               f"expected layout: {EXPECTED_LAYOUT[self.key]}")
        entries = []
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            label = label_root / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise SmoosegError(
                    f"cityscapes: {len(images)} images but {len(labels)} label maps in "
                    f"{label_root}; missing {label}; expected layout: {EXPECTED_LAYOUT[self.key]}")
            entries.append((stem, image, label))
        if len(labels) != len(images):
            raise SmoosegError(
                f"cityscapes: {len(images)} images in {image_root} but {len(labels)} label maps "
                f"in {label_root}; remove the extra label maps or restore the images")
        super().__init__(entries, 27, CITYSCAPES_CLASSES, transform, split, seed)

    def label_rule(self):
        return ("a Cityscapes label is the single-channel *_gtFine_labelIds.png of its image, the "
                "same size")

    def read_label(self, path):
        return map_ids(read_label_png(path, self.label_rule()), CITYSCAPES_TABLE)


class Potsdam(SegmentationDataset):
    """Potsdam-3: ``.mat`` tiles, six ISPRS ids merged into three classes."""

    key = "potsdam"
    exif = False

    def __init__(self, data_dir, split, transform, seed=0):
        if split not in POTSDAM_SPLITS:
            raise SmoosegError(f"potsdam: unknown split '{split}'; use one of "
                               f"{', '.join(POTSDAM_SPLITS)}")
        root = Path(data_dir) / "potsdam"
        if not root.is_dir():
            raise _missing(self.key, "folder", root)
        entries = []
        for list_name in POTSDAM_SPLITS[split]:
            list_path = root / f"{list_name}.txt"
            ids = _read_list(self.key, list_path)
            images = [root / "imgs" / f"{i}.mat" for i in ids]
            labels = [root / "gt" / f"{i}.mat" for i in ids]
            _check_exist(self.key, list_path, images + labels)
            entries.extend(zip(ids, images, labels))
        super().__init__(entries, 3, POTSDAM_CLASSES, transform, split, seed)

    def label_rule(self):
        return "a Potsdam label is gt/<id>.mat holding an H x W id array 'gt', the size of its 'img'"

    def check_pair_header(self, image_path, label_path):
        image_shape = mat_shape(image_path, "img")
        label_shape = mat_shape(label_path, "gt")
        if len(image_shape) != 3 or image_shape[2] < 3:
            raise SmoosegError(f"{image_path}: 'img' has shape {image_shape}; expected H x W x >=3 (RGB)")
        if len(label_shape) == 3 and label_shape[2] == 1:
            label_shape = label_shape[:2]
        if len(label_shape) != 2:
            raise SmoosegError(f"{label_path}: 'gt' has shape {label_shape}; expected an H x W id map")
        self.check_size(image_path, label_path, (image_shape[1], image_shape[0]), label_shape)

    def read_image(self, path):
        return Image.fromarray(potsdam_image(read_mat(path, "img"), path))

    def read_label(self, path):
        gt = read_mat(path, "gt")
        if gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[..., 0]
        if gt.ndim != 2:
            raise SmoosegError(f"{path}: 'gt' has shape {gt.shape}; expected an H x W id map")
        return map_ids(gt, POTSDAM_TABLE)


class DirectoryDataset(SegmentationDataset):
    """A user's own images, optionally with label PNGs (ids 0..n_classes-1, 255 = ignore)."""

    key = "directory"
    label_check = "full"  # own data: every label decoded and its ids checked when the set is built

    def __init__(self, root, split, n_classes, transform, seed=0):
        root = Path(root)
        image_dir, label_dir = root / "imgs" / split, root / "labels" / split
        if not image_dir.is_dir():
            raise _missing(self.key, "image folder", image_dir)
        images = _image_files(image_dir)
        if not images:
            raise SmoosegError(f"directory: no images in {image_dir}; put .jpg/.png files there")
        if label_dir.is_dir():
            labels = pair_labels(images, _image_files(label_dir), image_dir, label_dir)
        else:
            labels = [None] * len(images)
        entries = [(image.stem, image, label) for image, label in zip(images, labels)]
        super().__init__(entries, n_classes, class_names("directory", n_classes), transform,
                         split, seed)

    def label_rule(self):
        return (f"a label is a single-channel PNG (mode L, P or I;16) of class ids 0..{self.n_classes - 1} "
                "(255 = ignore), the size of its image after EXIF orientation, named <image stem>.png "
                "or <image stem>_gt.png")

    def read_label(self, path):
        ids = read_label_png(path, self.label_rule())
        bad = np.setdiff1d(np.unique(ids), np.r_[np.arange(self.n_classes), 255])
        if bad.size:
            raise SmoosegError(
                f"label {path} holds class id {int(bad[0])} but n_classes={self.n_classes}; "
                f"{self.label_rule()}: fix the file or raise n_classes")
        return np.where(ids == 255, -1, ids)


def crop_set_error(folder, problem, command, verb="finish"):
    """The one message about a cropped training set that cannot be read: the folder, what is wrong
    with it, the ``crop_datasets.py`` command that writes or finishes it, and the raw-image option."""
    return SmoosegError(f"the cropped training set {folder} {problem}; {verb} it with `{command}`, or "
                        "train on the raw images with dataset.train_crop_source=null")


class CroppedDataset(SegmentationDataset):
    """Pre-cropped training set written by ``crop_datasets.py`` (labels stored + 1).

    Read only when complete: its completion record (:data:`CROP_RECORD`, written last by the crop
    writer) must list ``split`` with exactly the crops found on disk; otherwise the error names
    ``command``, the ``crop_datasets.py`` command that finishes it (a re-run resumes).
    """

    key = "cropped"
    label_check = None  # written by crop_datasets.py from checked labels; the record vouches for it

    def __init__(self, data_dir, dataset, crop_type, ratio, split, n_classes, names,
                 transform, seed=0, command=None):
        root = Path(data_dir) / "cropped" / crop_dir_name(dataset, crop_type, ratio)
        command = command or crop_command(data_dir, dataset, crop_type, ratio, split)
        image_dir, label_dir = root / "img" / split, root / "label" / split
        for folder in (root, image_dir, label_dir):
            if not folder.is_dir():
                raise crop_set_error(folder, "does not exist", command, verb="write")
        record = read_crop_record(root)
        entry = (record or {}).get("splits", {}).get(split)
        if entry is None:
            why = (f"has no completion record {CROP_RECORD}" if record is None
                   else f"has no completion entry for split {split} in {CROP_RECORD}")
            raise crop_set_error(root, f"is incomplete: it {why} (a crop run was interrupted or is "
                                       "still running)", command)
        images, labels = _numbered(image_dir, ".jpg"), _numbered(label_dir, ".png")
        expected = int(entry.get("crops", -1))
        numbers = list(range(max(expected, 0)))
        if images != set(numbers) or labels != set(numbers):
            raise crop_set_error(root, f"does not match its completion record: img/{split} holds "
                                       f"{len(images)} crops and label/{split} {len(labels)} but "
                                       f"{CROP_RECORD} says {expected}", command)
        entries = [(str(n), image_dir / f"{n}.jpg", label_dir / f"{n}.png") for n in numbers]
        super().__init__(entries, n_classes, names, transform, split, seed)

    def read_label(self, path):
        stored = read_label_png(path)
        bad = stored[(stored < 0) | (stored > self.n_classes)]
        if bad.size:
            raise SmoosegError(f"cropped label {path} holds {int(bad[0]) - 1} but n_classes="
                               f"{self.n_classes}; delete the crop folder and run crop_datasets.py")
        return stored - 1


def dataset_key(name, dir_name=None):
    """Name used for a data set's crop folder (the directory set's folder name)."""
    return (dir_name or "directory") if name == "directory" else name


def _data_dir(data_dir, name):
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise SmoosegError(f"data_dir {path} is a file, not a folder; pass data_dir=<folder holding the "
                           f"data sets>; expected layout: {EXPECTED_LAYOUT[name]}")
    if not path.is_dir():
        raise SmoosegError(
            f"data_dir {path} does not exist; pass data_dir=<folder holding the data sets> "
            f"(download_datasets.py fills it); expected layout: {EXPECTED_LAYOUT[name]}")
    return path


def build_dataset(name, data_dir, split, res, crop="center", image_interp="nearest",
                  n_classes=None, crop_source=None, seed=0, dir_name=None):
    """Build a reader; see the module docstring for layouts and the item format.

    ``crop_source`` (e.g. ``{"crop_type": "five", "ratio": 0.5}``) reads the pre-cropped set
    of ``name`` instead of the originals. For ``directory`` the set lives in
    ``<data_dir>/<dir_name>`` (``dir_name=None``: ``data_dir`` itself holds ``imgs/``).
    """
    if name not in DATASETS:
        raise SmoosegError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    transform = JointTransform(res, crop=crop, image_interp=image_interp)
    root = _data_dir(data_dir, name)
    n = n_classes_of(name, n_classes)
    if crop_source is not None and crop_source.get("crop_type") not in (None, "none"):
        if crop_source.get("ratio") is None:
            raise SmoosegError("crop_source needs a ratio, e.g. {crop_type: five, ratio: 0.5}")
        key = dataset_key(name, dir_name)
        record = read_crop_record(Path(root) / "cropped" / crop_dir_name(
            key, crop_source["crop_type"], crop_source["ratio"])) or {}
        command = crop_command(data_dir, name, crop_source["crop_type"], crop_source["ratio"], split,
                               dir_name=dir_name, n_classes=n_classes, seed=record.get("seed")
                               if crop_source["crop_type"] == "random" else None)
        return CroppedDataset(root, key, crop_source["crop_type"], crop_source["ratio"], split, n,
                              class_names(name, n), transform, seed, command=command)
    if name == "cocostuff27":
        return CocoStuff27(root, split, transform, seed)
    if name == "cityscapes":
        return Cityscapes(root, split, transform, seed)
    if name == "potsdam":
        return Potsdam(root, split, transform, seed)
    return DirectoryDataset(root / dir_name if dir_name else root, split, n, transform, seed)
