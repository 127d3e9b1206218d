"""Backbone feature cache: compute the frozen backbone once per training image, train from disk.

The backbone never trains and the published training reads fixed (centre-cropped) images, so
its features are the same every epoch.  :func:`open_or_build` stores them once under
``<cache_dir>/<key>/``:

* ``feats.npy``  — N × C × h × w (float16 by default), read memory-mapped;
* ``labels.npy`` — N × H × W labels at the crop size (uint8 with 255 = ignore when the data
  set has fewer than 255 classes, else int16 with -1), kept for a linear probe;
* ``meta.json``  — written last and atomically: the cache is complete only when it exists and
  its fields match.  An interrupted build (no ``meta.json``) is rebuilt.

A cache is valid for the very files it was computed from: ``meta.json`` holds the digest of
every image's and label's path, size and modification time (:func:`files_digest`), so a
replaced, edited or touched file rebuilds the cache in place on the next run (the folder of a
given configuration stays one, rather than stale copies piling up on disk).

``key`` is the sha256 of everything that changes the features: data set, split, resolution,
crop, image interpolation, pre-cropped source, backbone arch / type / patch / feature type /
fit policy / the spec's position-embedding policy, a digest of the backbone weights (with its
input re-normalisation and DINOv3's RoPE periods) and the storage dtype.  Caches built before
the backbone registry stay valid: DINO / DINOv2 keys are unchanged.  Random crops make a cache
inexact and are refused.  :class:`CachedFeatureDataset` serves the stored features in the image
data set's order, so a shuffled DataLoader with the same seed yields the same batches.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from smooseg.errors import SmoosegError
from smooseg.io import atomic_write, check_output_dir
from smooseg.model.backbone import frozen_features
from smooseg.progress import progress_bar

CACHE_VERSION = 3  # 3: meta.json holds the files digest
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}
DETERMINISTIC_CROPS = ("center", "none")
FEATS_FILE, LABELS_FILE, META_FILE = "feats.npy", "labels.npy", "meta.json"


def check_deterministic(crop):
    """SmoosegError unless ``crop`` gives the same image every epoch (the cache would be inexact)."""
    if crop not in DETERMINISTIC_CROPS:
        raise SmoosegError(f"the feature cache needs deterministic crops (dataset.train_crop={crop}); "
                           "set dataset.train_crop=center or cache.enabled=false")


def weights_digest(backbone):
    """sha256 over the backbone state dict and its non-persistent buffers (an input
    re-normalisation): names, dtypes, shapes and the bytes of every tensor."""
    digest = hashlib.sha256()
    tensors = dict(backbone.named_buffers())
    tensors.update(backbone.state_dict())
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_fields(dataset_name, split, res, crop, image_interp, crop_source, backbone, dtype="float16",
                 data_dir=None):
    """Everything the cached features depend on, as a JSON-ready dict (the cache key's input)."""
    if dtype not in CACHE_DTYPES:
        raise SmoosegError(f"cache.dtype={dtype} is unknown; use one of {', '.join(CACHE_DTYPES)}")
    return {
        "version": CACHE_VERSION, "dataset": str(dataset_name), "split": str(split),
        "data_dir": None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
        "res": None if res is None else int(res), "crop": str(crop), "image_interp": str(image_interp),
        "crop_source": None if crop_source is None else {k: crop_source[k] for k in sorted(crop_source)},
        "arch": backbone.arch, "model_type": backbone.model_type, "patch_size": int(backbone.patch_size),
        "feat_type": backbone.feat_type, "fit": backbone.fit, "pos_embed": backbone.pos_embed_policy,
        "weights": weights_digest(backbone),
        "dtype": dtype,
    }


def cache_key(fields):
    """Folder name of a cache: sha256 of its fields (canonical JSON)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def names_digest(names):
    """sha256 of the ordered item names (detects a changed image list)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def files_digest(dataset):
    """sha256 over the path, size and modification time (ns) of every image and label file of
    ``dataset`` (its ``entries``), in order; None for a data set without file entries."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        return None
    digest = hashlib.sha256()
    for entry in entries:
        for path in entry[1:]:
            if path is None:
                digest.update(b"-|")
                continue
            try:
                info = os.stat(path)
                digest.update(f"{path}|{info.st_size}|{info.st_mtime_ns}|".encode())
            except OSError:
                digest.update(f"{path}|missing|".encode())
    return digest.hexdigest()


def label_storage(n_classes):
    """(numpy dtype, stored ignore value) for labels of a data set with ``n_classes`` classes."""
    return (np.uint8, 255) if n_classes < 255 else (np.int16, -1)


def read_meta(path):
    """The meta dict of a cache folder, or None when it is missing or unreadable (incomplete)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path, fields, names, files=None):
    """Whether ``path`` holds a finished cache for ``fields``, the item list ``names`` and (when
    given) the files of :func:`files_digest` ``files``."""
    meta = read_meta(path)
    return (meta is not None and meta.get("fields") == fields and meta.get("n") == len(names)
            and meta.get("names_sha256") == names_digest(names)
            and (files is None or meta.get("files_sha256") == files)
            and all((Path(path) / f).is_file() for f in (FEATS_FILE, LABELS_FILE)))


class CachedFeatureDataset(Dataset):
    """Items ``dict(feats=Float[C,h,w], label=Long[H,W] (-1 ignore), name=str)`` of a complete cache.

    Index i is image i of the data set the cache was built from.  The arrays are memory-mapped
    lazily in each process (DataLoader workers included).
    """

    def __init__(self, path):
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None:
            raise SmoosegError(f"feature cache {self.path} is incomplete (no {META_FILE}); "
                               "delete the folder and train again to rebuild it")
        self.meta = meta
        self.names = list(meta["names"])
        self.n_classes = int(meta["n_classes"])
        self.ignore = int(meta["label_ignore"])
        self._feats = self._labels = None

    def __len__(self):
        return len(self.names)

    @property
    def feats(self):
        if self._feats is None:
            self._feats = np.load(self.path / FEATS_FILE, mmap_mode="r")
        return self._feats

    @property
    def labels(self):
        if self._labels is None:
            self._labels = np.load(self.path / LABELS_FILE, mmap_mode="r")
        return self._labels

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_feats"] = state["_labels"] = None
        return state

    def __getitem__(self, index):
        feats = torch.from_numpy(np.array(self.feats[index], dtype=np.float32))
        label = torch.from_numpy(self.labels[index].astype(np.int64))
        label[label == self.ignore] = -1
        return {"feats": feats, "label": label, "name": self.names[index]}


def _item_shapes(dataset, backbone):
    """(image H, W) of item 0 and the backbone's (C, h, w) for it, without running the backbone."""
    img = dataset[0]["img"]
    fitted = backbone.fit_input(img[None])
    p = backbone.patch_size
    return tuple(img.shape[-2:]), (backbone.n_feats, fitted.shape[-2] // p, fitted.shape[-1] // p)


def _megabytes(n_bytes):
    return n_bytes / 2**20


def _check_disk(path, n_bytes):
    free = shutil.disk_usage(path).free
    if free < n_bytes * 1.05:
        raise SmoosegError(f"feature cache needs {_megabytes(n_bytes):.0f} MB at {path} but only "
                           f"{_megabytes(free):.0f} MB are free; free space, set cache.dir=<other disk> "
                           "or cache.enabled=false")


def _fill(loader, backbone, feats, labels, ignore, precision, device, progress):
    """Write the backbone features and labels of every batch of ``loader`` into the memmaps."""
    H, W = labels.shape[1:]
    start = 0
    with progress_bar(total=len(feats), desc="feature cache", unit="img", disable=not progress) as bar:
        for batch in loader:
            img, label = batch["img"], batch["label"].numpy()
            if tuple(img.shape[-2:]) != (H, W):
                raise SmoosegError(f"feature cache: training images have different sizes "
                                   f"({tuple(img.shape[-2:])} vs {(H, W)}); set dataset.train_crop=center "
                                   "or cache.enabled=false")
            out = frozen_features(backbone, img.to(device, non_blocking=True), precision)
            stop = start + img.shape[0]
            feats[start:stop] = out.cpu().numpy().astype(feats.dtype, copy=False)
            labels[start:stop] = np.where(label < 0, ignore, label).astype(labels.dtype)
            start = stop
            bar.update(img.shape[0])


def build_feature_cache(dataset, backbone, path, fields, batch_size=32, num_workers=0, device="cpu",
                        precision="auto", progress=True, files=None):
    """Run ``backbone`` over every item of ``dataset`` and store the cache in ``path``.

    Prints the expected disk size first.  ``meta.json`` is written last, so an interrupted
    build leaves an incomplete cache that the next call rebuilds.  ``files`` (default: the
    :func:`files_digest` of ``dataset``, taken before reading) is recorded for :func:`is_complete`.
    Returns the dataset view.
    """
    check_deterministic(getattr(dataset.transform, "crop", "center"))
    n = len(dataset)
    if n == 0:
        raise SmoosegError(f"feature cache: the {dataset.split} set is empty; check data_dir")
    path, device = Path(path), torch.device(device)
    names = [dataset.item_name(i) for i in range(n)]
    files = files_digest(dataset) if files is None else files
    dtype = CACHE_DTYPES[fields["dtype"]]
    label_dtype, ignore = label_storage(dataset.n_classes)
    (H, W), feat_shape = _item_shapes(dataset, backbone)
    feat_bytes = n * int(np.prod(feat_shape)) * np.dtype(dtype).itemsize
    label_bytes = n * H * W * np.dtype(label_dtype).itemsize
    print(f"feature cache: {n} images × {'×'.join(map(str, feat_shape))} {fields['dtype']} = "
          f"{_megabytes(feat_bytes):.1f} MB (+ {_megabytes(label_bytes):.1f} MB labels) at {path}",
          flush=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)
    _check_disk(path, feat_bytes + label_bytes)
    feats = np.lib.format.open_memmap(path / FEATS_FILE, mode="w+", dtype=dtype, shape=(n, *feat_shape))
    labels = np.lib.format.open_memmap(path / LABELS_FILE, mode="w+", dtype=label_dtype, shape=(n, H, W))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    was_training, home = backbone.training, next(backbone.parameters()).device
    try:
        _fill(loader, backbone.to(device).eval(), feats, labels, ignore, precision, device, progress)
    finally:
        backbone.to(home).train(was_training)
    feats.flush()
    labels.flush()
    del feats, labels
    meta = {"fields": fields, "n": n, "feat_shape": list(feat_shape), "label_shape": [H, W],
            "label_dtype": np.dtype(label_dtype).name, "label_ignore": ignore,
            "n_classes": int(dataset.n_classes), "names_sha256": names_digest(names),
            "files_sha256": files, "names": names}
    with atomic_write(path / META_FILE) as tmp:
        Path(tmp).write_text(json.dumps(meta))
    return CachedFeatureDataset(path)


def open_or_build(dataset, backbone, cache_dir, dataset_name, split, res, crop, image_interp,
                  crop_source=None, dtype="float16", batch_size=32, num_workers=0, device="cpu",
                  precision="auto", progress=True, data_dir=None):
    """The cached features of ``dataset`` under ``cache_dir``: reused when complete, else built.

    Random crops raise a SmoosegError (the cache would differ from what training sees).
    """
    check_deterministic(crop)
    fields = cache_fields(dataset_name, split, res, crop, image_interp, crop_source, backbone, dtype,
                          data_dir)
    path = Path(cache_dir).expanduser() / cache_key(fields)
    names = [dataset.item_name(i) for i in range(len(dataset))]
    files = files_digest(dataset)
    if is_complete(path, fields, names, files):
        print(f"feature cache: reusing {path}", flush=True)
        return CachedFeatureDataset(path)
    # the cache is (re)built: its folder must take files (one line now, not an OSError mid-build)
    check_output_dir(path if path.exists() else Path(cache_dir).expanduser(), "cache.dir")
    if read_meta(path) is not None:
        print(f"feature cache: {path} was computed from other files or settings; rebuilding it", flush=True)
    return build_feature_cache(dataset, backbone, path, fields, batch_size=batch_size,
                               num_workers=num_workers, device=device, precision=precision,
                               progress=progress, files=files)
