"""Pre-cropped training sets (docs/method.md §7): five crops or seeded random crops of every image.

Crops are cut from the full-resolution image and label (``dataset.load_raw``). Crop ``n`` of
item ``i`` is numbered ``5·i + n`` and written to
``<data_dir>/cropped/<dataset>_<crop_type>_crop_<ratio>/img/<split>/<5i+n>.jpg`` and
``label/<split>/<5i+n>.png`` (label + 1 as uint8, 0 = ignore). Images are JPEG at quality 75,
Pillow's default, as the reference saves them.

Resumable and crash-safe: every file is written under a temporary name and renamed when
complete; finished files are skipped on a re-run; temporary files left by a killed run are
deleted when the next run starts. Random crops of item ``i`` depend only on ``(seed, i)``,
so a resumed run reproduces them exactly.

Complete only when recorded: ``<folder>/complete.json`` holds the settings (crop type, ratio,
seed, JPEG quality; written when a run starts, so a resume with other settings is refused) and,
per split, the source image and crop counts, added LAST, after every crop of the split is on
disk and checked. The reader (:class:`smooseg.data.datasets.CroppedDataset`) refuses a split
without its entry, or whose files disagree with it, naming the command that finishes it.
"""

import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from smooseg.data.datasets import (CROP_RECORD, CROP_RECORD_FORMAT, _numbered, build_dataset, crop_dir_name,
                                   dataset_key, n_classes_of, read_crop_record)
from smooseg.errors import SmoosegError
from smooseg.io import atomic_write, write_json
from smooseg.signals import SigtermLatch, worker_signals

CROP_TYPES = ("five", "random")
CROPS_PER_IMAGE = 5
JPEG_QUALITY = 75


def crop_size(h, w, ratio):
    """Crop height and width: ``ratio`` times each side, truncated (at least 1 pixel)."""
    return max(1, int(h * ratio)), max(1, int(w * ratio))


def five_crops(h, w, ratio):
    """Boxes ``(top, left, height, width)``: top-left, top-right, bottom-left, bottom-right,
    centre."""
    ch, cw = crop_size(h, w, ratio)
    centre = (int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw)
    return [(0, 0, ch, cw), (0, w - cw, ch, cw), (h - ch, 0, ch, cw), (h - ch, w - cw, ch, cw),
            centre]


def random_crops(h, w, ratio, rng, n=CROPS_PER_IMAGE):
    """``n`` boxes of the same size as :func:`five_crops`, corners drawn uniformly from ``rng``."""
    ch, cw = crop_size(h, w, ratio)
    return [(int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
            for _ in range(n)]


def crop_boxes(crop_type, h, w, ratio, seed, index):
    """The five boxes of item ``index``; random crops are seeded by ``(seed, index)`` only."""
    if crop_type == "five":
        return five_crops(h, w, ratio)
    if crop_type == "random":
        return random_crops(h, w, ratio, np.random.default_rng([int(seed), int(index)]))
    raise SmoosegError(f"unknown crop type '{crop_type}'; use one of {', '.join(CROP_TYPES)}")


def crop_folder(data_dir, dataset, crop_type, ratio):
    """Root of a cropped set: ``<data_dir>/cropped/<dataset>_<crop_type>_crop_<ratio>``."""
    return Path(data_dir) / "cropped" / crop_dir_name(dataset, crop_type, ratio)


def _paths(folder, split, number):
    return (folder / "img" / split / f"{number}.jpg", folder / "label" / split / f"{number}.png")


def write_item_crops(dataset, index, folder, split, crop_type, ratio, seed=0,
                     jpeg_quality=JPEG_QUALITY):
    """Write the five crops of item ``index``; returns how many files were written."""
    numbers = [CROPS_PER_IMAGE * index + n for n in range(CROPS_PER_IMAGE)]
    todo = [(n, path) for n in numbers for path in _paths(folder, split, n) if not path.exists()]
    if not todo:
        return 0
    image, label = dataset.load_raw(index)
    if label is None:
        label = np.full((image.height, image.width), -1, dtype=np.int64)
    if label.size and int(label.max()) > 254:
        raise SmoosegError(f"{dataset.item_name(index)}: label id {int(label.max())} does not fit "
                           f"the crop format (label + 1 must be <= 255)")
    stored = (label + 1).astype(np.uint8)
    boxes = crop_boxes(crop_type, image.height, image.width, ratio, seed, index)
    box_of = dict(zip(numbers, boxes))
    for number, path in todo:
        top, left, h, w = box_of[number]
        with atomic_write(path) as tmp:
            if path.suffix == ".jpg":
                image.crop((left, top, left + w, top + h)).save(tmp, format="JPEG",
                                                                quality=int(jpeg_quality))
            else:
                Image.fromarray(stored[top:top + h, left:left + w]).save(tmp, format="PNG")
    return len(todo)


def remove_stale_temps(folder):
    """Delete temporary files a killed run left behind (``.<name>.<random>.tmp``)."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# Settings a cropped set is written with; a resumed run must use the same (seed: random crops only).
RECORD_SETTINGS = ("crop_type", "ratio", "jpeg_quality", "seed")


def record_settings(crop_type, ratio, seed, jpeg_quality):
    """The settings part of a cropped set's completion record."""
    return {"format": CROP_RECORD_FORMAT, "crop_type": crop_type, "ratio": float(ratio),
            "jpeg_quality": int(jpeg_quality), "seed": int(seed)}


def begin_record(folder, split, settings):
    """Before the first crop of ``split`` is written: check a resumed set was started with the same
    settings, and record ``split`` as not complete (its entry is added back by :func:`finish_record`)."""
    record = read_crop_record(folder)
    splits = {}
    if record is not None:
        for key in RECORD_SETTINGS:
            if key == "seed" and settings["crop_type"] != "random":
                continue
            if key in record and record[key] != settings[key]:
                raise SmoosegError(
                    f"cropped set {folder} was started with {key}={record[key]} ({CROP_RECORD}) but this "
                    f"run asks for {key}={settings[key]}; pass {key}={record[key]} to finish it, or delete "
                    f"{folder} to write it anew")
        splits = {name: entry for name, entry in record["splits"].items() if name != split}
    write_json({**settings, "splits": splits}, Path(folder) / CROP_RECORD)


def finish_record(folder, split, n_images, settings):
    """After every crop of ``split`` is written: check the files are exactly the ``5·n_images``
    crops, then add the split's counts to the completion record (the last file written)."""
    folder = Path(folder)
    expected = CROPS_PER_IMAGE * n_images
    for sub, suffix in (("img", ".jpg"), ("label", ".png")):
        found = _numbered(folder / sub / split, suffix)
        extra = sorted(found - set(range(expected)))
        if extra:
            raise SmoosegError(
                f"cropped set {folder / sub / split} holds {len(extra)} crops beyond the {expected} of "
                f"the {n_images} source images (e.g. {extra[0]}{suffix}, left by a run on a larger data "
                f"set); delete {folder} and run crop_datasets.py again")
        missing = sorted(set(range(expected)) - found)
        if missing:
            raise SmoosegError(f"cropped set {folder / sub / split} lacks crop {missing[0]}{suffix} after "
                               "writing; is another crop_datasets.py run deleting files? run it again")
    record = read_crop_record(folder) or {**settings, "splits": {}}
    record["splits"][split] = {"source_images": int(n_images), "crops": expected}
    write_json(record, folder / CROP_RECORD)


_JOB = {}


def _init_worker(job, worker=True):
    if worker:
        worker_signals()
    _JOB.update(job)


def _work(index):
    return write_item_crops(_JOB["dataset"], index, _JOB["folder"], _JOB["split"],
                            _JOB["crop_type"], _JOB["ratio"], _JOB["seed"], _JOB["jpeg_quality"])


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _results(results, n, check, poll_s=0.5):
    """The ``n`` results of a pool's ``imap``, calling ``check`` after each and at least every
    ``poll_s`` seconds while none arrives (a worker killed with its job in hand never answers)."""
    for _ in range(n):
        while True:
            try:
                value = results.next(timeout=poll_s)
                break
            except multiprocessing.TimeoutError:
                check()
        check()
        yield value


def crop_dataset(dataset, folder, split, crop_type, ratio, seed=0, num_workers=0,
                 jpeg_quality=JPEG_QUALITY, progress=True):
    """Write all crops of ``dataset`` under ``folder``, then its completion record; returns
    ``dict(written=, images=)``."""
    if crop_type not in CROP_TYPES:
        raise SmoosegError(f"unknown crop type '{crop_type}'; use one of {', '.join(CROP_TYPES)}")
    if not 0 < float(ratio) <= 1:
        raise SmoosegError(f"crop_ratio={ratio} must be in (0, 1], e.g. crop_ratio=0.5")
    folder = Path(folder)
    if folder.exists():
        remove_stale_temps(folder)
    settings = record_settings(crop_type, ratio, seed, jpeg_quality)
    begin_record(folder, split, settings)
    job = dict(dataset=dataset, folder=folder, split=split, crop_type=crop_type,
               ratio=float(ratio), seed=int(seed), jpeg_quality=int(jpeg_quality))
    bar = tqdm(total=len(dataset), desc=f"{folder.name}/{split}", unit="img", disable=not progress)
    written = 0
    stopped = (f"stopped by SIGTERM: the finished crops of {folder} are kept; run the same command "
               "again to finish the set")
    with bar, SigtermLatch() as sigterm:  # checked after each image; the pool is then terminated
        if num_workers and num_workers > 0:
            with _pool_context().Pool(int(num_workers), _init_worker, (job,)) as pool:
                # chunksize 1: the iterator itself (with a timeout), not a generator over chunks
                for count in _results(pool.imap_unordered(_work, range(len(dataset)), chunksize=1),
                                      len(dataset), lambda: sigterm.check(stopped)):
                    written += count
                    bar.update()
        else:
            _init_worker(job, worker=False)
            for index in range(len(dataset)):
                written += _work(index)
                bar.update()
                sigterm.check(stopped)
    finish_record(folder, split, len(dataset), settings)
    return {"written": written, "images": len(dataset)}


def crop_datasets(data_dir, datasets, splits, crop_types, ratio, seed=0, num_workers=0,
                  jpeg_quality=JPEG_QUALITY, dir_name=None, n_classes=None, progress=True):
    """Crop every (data set, split, crop type); returns ``{folder/split: summary}``.

    Every data set is opened (and so checked) before the first crop is written.
    """
    summary = {}
    if "directory" in datasets:
        n_classes_of("directory", n_classes, key="dir_dataset_n_classes")
    opened = [(name, split, build_dataset(name, data_dir, split, res=None, crop="none",
                                          n_classes=n_classes if name == "directory" else None,
                                          seed=seed, dir_name=dir_name))
              for name in datasets for split in splits]
    for name, split, dataset in opened:
        for crop_type in crop_types:
            folder = crop_folder(data_dir, dataset_key(name, dir_name), crop_type, ratio)
            result = crop_dataset(dataset, folder, split, crop_type, ratio, seed,
                                  num_workers, jpeg_quality, progress)
            summary[f"{folder.name}/{split}"] = result
    return summary
