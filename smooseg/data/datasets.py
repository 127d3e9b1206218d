"""Build the reader of any data set by name (docs/method.md §7).

Each data set is declared once, by its :class:`~smooseg.data.spec.DatasetSpec` in
``smooseg/data/sets/<name>.py`` (layout, classes, label map, splits, reader);
:func:`build_dataset` opens one, raw or as its pre-cropped set (:mod:`smooseg.data.cropped`).
Every reader yields ``dict(img=Float[3,H,W] normalised, label=Long[H,W] with -1 = ignore,
name=str)`` (:mod:`smooseg.data.reader`).
"""

from pathlib import Path

from smooseg.data.cropped import CROP_TYPES, CroppedDataset, crop_command, crop_folder, read_crop_record
from smooseg.data.info import DatasetInfo, class_names, default_eval_res
from smooseg.data.registry import dataset_spec
from smooseg.data.transforms import JointTransform
from smooseg.errors import SmoosegError

__all__ = ["DatasetInfo", "build_dataset", "check_crop_source", "class_names", "dataset_key", "dataset_spec",
           "default_eval_res", "n_classes_of"]

CLASS_COUNT_KEY, CLUSTER_COUNT_KEY = "dataset.n_classes", "dataset.n_clusters"


def _count(value, key):
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise SmoosegError(f"{key}={value} is not a whole number; pass e.g. {key}=5")
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise SmoosegError(f"{key}={value} is not a whole number; pass e.g. {key}=5") from None
    if count < 1:
        raise SmoosegError(f"{key}={value} must be at least 1, e.g. {key}=5")
    return count


def n_classes_of(name, n_classes=None, key=CLASS_COUNT_KEY, n_clusters=None):
    """The number of classes of data set ``name``.

    A set whose spec has classes must not be given another count. A set whose classes the user
    counts takes ``n_classes`` (the config value ``key``: the classes of its labels) or, without
    labels, ``n_clusters`` (the clusters to find); the two must agree when both are set.
    """
    spec = dataset_spec(name)
    if spec.n_classes is not None:
        if n_clusters is not None:
            raise SmoosegError(f"{CLUSTER_COUNT_KEY}={n_clusters} is for data sets without labels; {name} "
                               f"has {spec.n_classes} classes: drop it (more clusters: extra_clusters=N)")
        if n_classes is not None and _count(n_classes, key) != spec.n_classes:
            raise SmoosegError(f"{name} has {spec.n_classes} classes, not {key}={n_classes}; "
                               "drop the override")
        return spec.n_classes
    if n_classes is None and n_clusters is None:
        if key != CLASS_COUNT_KEY:
            raise SmoosegError(f"{key} is not set; a {name} data set needs its number of classes (without "
                               f"labels: the number of clusters to find), e.g. {key}=5")
        raise SmoosegError(f"{CLUSTER_COUNT_KEY} is not set; a {name} data set without labels needs the "
                           f"number of clusters to find, e.g. {CLUSTER_COUNT_KEY}=5 (with labels: "
                           f"{CLASS_COUNT_KEY}=<the number of classes in them>)")
    given = ((key, n_classes), (CLUSTER_COUNT_KEY, n_clusters))
    counts = {k: _count(v, k) for k, v in given if v is not None}
    if len(set(counts.values())) > 1:
        raise SmoosegError(f"{key}={n_classes} and {CLUSTER_COUNT_KEY}={n_clusters} disagree; set one: "
                           f"{key} for labelled images, {CLUSTER_COUNT_KEY} for images without labels")
    return next(iter(counts.values()))


def dataset_key(name, dir_name=None):
    """Name used for a data set's crop folders (user-named sets: their folder name)."""
    return dataset_spec(name).crop_key(dir_name)


def _data_dir(data_dir, spec):
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise SmoosegError(f"data_dir {path} is a file, not a folder; pass data_dir=<folder holding the "
                           f"data sets>; expected layout: {spec.layout}")
    if not path.is_dir():
        raise SmoosegError(
            f"data_dir {path} does not exist; pass data_dir=<folder holding the data sets> "
            f"(download_datasets.py fills it); expected layout: {spec.layout}")
    return path


def check_crop_source(crop_source, key="dataset.train_crop_source"):
    """``(crop_type, ratio)`` of a crop source mapping, or None for none; one-line errors naming
    ``key`` and the values ``crop_datasets.py`` accepts."""
    if crop_source is None or crop_source.get("crop_type") in (None, "none"):
        return None
    crop_type = crop_source.get("crop_type")
    if crop_type not in CROP_TYPES:
        raise SmoosegError(f"{key}.crop_type={crop_type} is unknown; use one of {', '.join(CROP_TYPES)} "
                           f"(the crop types crop_datasets.py writes), or {key}=null for the raw images")
    if crop_source.get("ratio") is None:
        raise SmoosegError(f"{key} needs a ratio, e.g. {{crop_type: {crop_type}, ratio: 0.5}}")
    return crop_type, float(crop_source["ratio"])


def _check_split(spec, split):
    if spec.native_splits(split) is None:
        raise SmoosegError(f"{spec.name}: unknown split '{split}'; use one of {', '.join(spec.splits)}")


def _cropped(spec, root, split, n, transform, seed, crop_source, dir_name, n_classes, data_dir):
    crop_type, ratio = check_crop_source(crop_source)
    folder = crop_folder(root, spec.crop_key(dir_name), crop_type, ratio)
    record = read_crop_record(folder) or {}
    command = crop_command(data_dir, spec, crop_type, ratio, split, dir_name=dir_name, n_classes=n_classes,
                           seed=record.get("seed") if crop_type == "random" else None)
    source_root = spec.root(root, dir_name)
    source = spec.reader.list_items(spec, source_root, split) if source_root.is_dir() else None
    return CroppedDataset(spec, folder, split, n, transform, seed, command=command, source=source,
                          class_names=class_names(spec.name, n))


def build_dataset(name, data_dir, split, res, crop="center", image_interp="nearest",
                  n_classes=None, crop_source=None, seed=0, dir_name=None, n_clusters=None):
    """Open split ``split`` of data set ``name`` under ``data_dir``.

    ``crop_source`` (e.g. ``{"crop_type": "five", "ratio": 0.5}``) reads the pre-cropped set
    instead of the originals. User-named sets live in ``<data_dir>/<dir_name>`` (``dir_name=None``:
    ``data_dir`` itself holds ``imgs/``) and take ``n_classes`` or ``n_clusters``
    (:func:`n_classes_of`).
    """
    spec = dataset_spec(name)
    transform = JointTransform(res, crop=crop, image_interp=image_interp)
    root = _data_dir(data_dir, spec)
    n = n_classes_of(name, n_classes, n_clusters=n_clusters)
    _check_split(spec, split)
    if check_crop_source(crop_source) is not None:
        return _cropped(spec, root, split, n, transform, seed, crop_source, dir_name,
                        n_classes if n_classes is not None else n_clusters, data_dir)
    entries = spec.reader.list_items(spec, spec.root(root, dir_name), split)
    return spec.reader(spec, entries, n, transform, split, seed, class_names=class_names(name, n))
