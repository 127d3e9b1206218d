"""Pre-cropped training sets (docs/method.md §7): five crops or seeded random crops of every image.

Crops are cut from the full-resolution image and label (``dataset.load_raw``) and written to the
set's folder (:func:`smooseg.data.cropped.crop_folder`) as ``img/<split>/<item>_<n>.jpg`` and
``label/<split>/<item>_<n>.png`` (label + 1 as uint8, 0 = ignore), named after their source
item. Images are JPEG at quality 75, Pillow's default, as the reference saves them. Random crops
of an item depend only on (seed, its name).

Resumable and crash-safe: every file is written under a temporary name and renamed when
complete, and the split's files are flushed to disk once, before its record; finished
(non-empty) files are skipped on a re-run; temporary files left by a killed run are deleted
when the next run starts. One run writes a set at a time: a second waits for the first
(a lock file, ``<folder>/.lock``, released when its holder ends however it ends).

Complete only when recorded: ``<folder>/complete.json`` holds the settings (crop type, ratio,
seed, JPEG quality; written when a run starts, so a resume with other settings is refused) and,
per split, its source listing (:func:`smooseg.data.cropped.source_listing`), added LAST, after
every crop of the split is on disk and checked. A re-run after source images were added,
removed or replaced brings the set up to date: crops of items no longer in the source (or
replaced since) are deleted, missing ones are written.
"""

import fcntl
import hashlib
import multiprocessing
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from smooseg.data.cropped import (
    CROP_RECORD,
    CROP_RECORD_FORMAT,
    CROP_TYPES,
    CROPS_PER_IMAGE,
    crop_folder,
    crop_item,
    crop_name,
    read_crop_record,
    source_listing,
    split_files,
)
from smooseg.data.datasets import build_dataset, dataset_key, n_classes_of
from smooseg.data.registry import dataset_spec
from smooseg.errors import SmoosegError
from smooseg.io import atomic_write, flush_to_disk, write_json
from smooseg.progress import progress_bar
from smooseg.signals import SigtermLatch, worker_signals

JPEG_QUALITY = 75
LOCK_NAME = ".lock"
CROP_FILES = (("img", ".jpg"), ("label", ".png"))


def _unknown_crop_type(crop_type):
    return SmoosegError(f"unknown crop type '{crop_type}'; use one of {', '.join(CROP_TYPES)}, e.g. "
                        f"crop_types=[{CROP_TYPES[0]}]")


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


def item_rng(seed, item):
    """The generator of item ``item``'s random crops: seeded by ``seed`` and the item's name only,
    so other items (added, removed, reordered) never change them."""
    digest = hashlib.sha256(str(item).encode()).digest()
    return np.random.default_rng([int(seed), *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


def crop_boxes(crop_type, h, w, ratio, seed, item):
    """The five boxes of source item ``item`` (its name)."""
    if crop_type == "five":
        return five_crops(h, w, ratio)
    if crop_type == "random":
        return random_crops(h, w, ratio, item_rng(seed, item))
    raise _unknown_crop_type(crop_type)


def _written(path):
    """A crop is written once its file is there and not empty (a crop renamed into place but not
    yet on disk when the machine lost power can come back empty)."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _paths(folder, split, stem):
    return (folder / "img" / split / f"{stem}.jpg", folder / "label" / split / f"{stem}.png")


def write_item_crops(dataset, index, folder, split, crop_type, ratio, seed=0,
                     jpeg_quality=JPEG_QUALITY):
    """Write the five crops of item ``index``; returns how many files were written."""
    item = dataset.item_name(index)
    stems = [crop_name(item, n) for n in range(CROPS_PER_IMAGE)]
    todo = [(n, path) for n, stem in enumerate(stems) for path in _paths(folder, split, stem)
            if not _written(path)]
    if not todo:
        return 0
    image, label = dataset.load_raw(index)
    if label is None:
        label = np.full((image.height, image.width), -1, dtype=np.int64)
    if label.size and int(label.max()) > 254:
        raise SmoosegError(f"{item}: label id {int(label.max())} does not fit "
                           f"the crop format (label + 1 must be <= 255)")
    stored = (label + 1).astype(np.uint8)
    boxes = crop_boxes(crop_type, image.height, image.width, ratio, seed, item)
    for n, path in todo:
        top, left, h, w = boxes[n]
        with atomic_write(path, durable=False) as tmp:  # flushed once, before the record
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


@contextmanager
def set_lock(folder):
    """Hold ``<folder>/.lock`` while writing a set; a second run waits for the first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another crop_datasets.py run writing {folder} to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


# Settings a cropped set is written with; a resumed run must use the same (seed: random crops only).
RECORD_SETTINGS = ("crop_type", "ratio", "jpeg_quality", "seed")


def record_settings(crop_type, ratio, seed, jpeg_quality):
    """The settings part of a cropped set's completion record."""
    return {"format": CROP_RECORD_FORMAT, "crop_type": crop_type, "ratio": float(ratio),
            "jpeg_quality": int(jpeg_quality), "seed": int(seed)}


def _check_resume(folder, record, settings):
    if record.get("format") != CROP_RECORD_FORMAT:
        raise SmoosegError(f"cropped set {folder} was written by an earlier version (crops numbered by "
                           f"position, record format {record.get('format')}); delete {folder} and run "
                           "crop_datasets.py again")
    for key in RECORD_SETTINGS:
        if key == "seed" and settings["crop_type"] != "random":
            continue
        if key in record and record[key] != settings[key]:
            raise SmoosegError(
                f"cropped set {folder} was started with {key}={record[key]} ({CROP_RECORD}) but this "
                f"run asks for {key}={settings[key]}; pass {key}={record[key]} to finish it, or delete "
                f"{folder} to write it anew")


def _remove_outdated(folder, split, listing, recorded):
    """Delete crops whose source item is gone, or was replaced since ``recorded`` (the split's
    last finished listing); returns how many files were deleted."""
    removed = 0
    for sub, suffix in CROP_FILES:
        for stem in split_files(folder, split, sub, suffix):
            item = crop_item(stem)
            if item is None:
                continue
            replaced = item in recorded and list(recorded[item]) != list(listing.get(item, []))
            if item not in listing or replaced:
                (Path(folder) / sub / split / f"{stem}{suffix}").unlink(missing_ok=True)
                removed += 1
    return removed


def begin_record(folder, split, settings, listing=None):
    """Before the first crop of ``split`` is written: check a resumed set was started with the same
    settings, delete crops the source ``listing`` no longer has, and record ``split`` as not
    complete (its entry is added back by :func:`finish_record`)."""
    record = read_crop_record(folder)
    splits = {}
    if record is not None:
        _check_resume(folder, record, settings)
        recorded = (record["splits"].get(split) or {}).get("items") or {}
        if listing is not None:
            _remove_outdated(folder, split, listing, recorded)
        splits = {name: entry for name, entry in record["splits"].items() if name != split}
    write_json({**settings, "splits": splits}, Path(folder) / CROP_RECORD)


def finish_record(folder, split, listing, settings):
    """After every crop of ``split`` is written: check the files are exactly the five crops of each
    item of ``listing``, flush them to disk, then add the split's listing to the completion record
    (the last file written)."""
    folder = Path(folder)
    expected = {crop_name(item, n) for item in listing for n in range(CROPS_PER_IMAGE)}
    for sub, suffix in CROP_FILES:
        found = split_files(folder, split, sub, suffix)
        extra = sorted(found - expected)
        if extra:
            raise SmoosegError(
                f"cropped set {folder / sub / split} holds {len(extra)} files that are not crops of the "
                f"{len(listing)} source images (e.g. {extra[0]}{suffix}); delete {folder} and run "
                "crop_datasets.py again")
        missing = sorted(expected - found)
        if missing:
            raise SmoosegError(f"cropped set {folder / sub / split} lacks crop {missing[0]}{suffix} after "
                               "writing; is another program deleting files? run crop_datasets.py again")
    flush_to_disk(folder)
    record = read_crop_record(folder) or {**settings, "splits": {}}
    record["splits"][split] = {"source_images": len(listing), "crops": len(expected), "items": listing}
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


def _write_all(dataset, job, num_workers, progress):
    folder = job["folder"]
    written = 0
    bar = progress_bar(total=len(dataset), desc=f"{folder.name}/{job['split']}", unit="img",
                       disable=not progress)
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
    return written


def crop_dataset(dataset, folder, split, crop_type, ratio, seed=0, num_workers=0,
                 jpeg_quality=JPEG_QUALITY, progress=True):
    """Write all crops of ``dataset`` under ``folder``, then its completion record; returns
    ``dict(written=, images=)``."""
    if crop_type not in CROP_TYPES:
        raise _unknown_crop_type(crop_type)
    if not 0 < float(ratio) <= 1:
        raise SmoosegError(f"crop_ratio={ratio} must be in (0, 1], e.g. crop_ratio=0.5")
    folder = Path(folder)
    listing = source_listing(dataset.entries)
    settings = record_settings(crop_type, ratio, seed, jpeg_quality)
    with set_lock(folder):
        remove_stale_temps(folder)
        begin_record(folder, split, settings, listing)
        job = dict(dataset=dataset, folder=folder, split=split, crop_type=crop_type,
                   ratio=float(ratio), seed=int(seed), jpeg_quality=int(jpeg_quality))
        written = _write_all(dataset, job, num_workers, progress)
        finish_record(folder, split, listing, settings)
    return {"written": written, "images": len(dataset)}


def crop_datasets(data_dir, datasets, splits, crop_types, ratio, seed=0, num_workers=0,
                  jpeg_quality=JPEG_QUALITY, dir_name=None, n_classes=None, progress=True):
    """Crop every (data set, split, crop type); returns ``{folder/split: summary}``.

    Every data set is opened (and so checked) before the first crop is written.
    """
    for crop_type in crop_types:
        if crop_type not in CROP_TYPES:
            raise _unknown_crop_type(crop_type)
    specs = [dataset_spec(name) for name in datasets]
    for spec in specs:
        if spec.n_classes is None:
            n_classes_of(spec.name, n_classes, key="dir_dataset_n_classes")
    opened = [(spec, split, build_dataset(spec.name, data_dir, split, res=None, crop="none",
                                          n_classes=n_classes if spec.n_classes is None else None,
                                          seed=seed, dir_name=dir_name))
              for spec in specs for split in splits]
    summary = {}
    for spec, split, dataset in opened:
        for crop_type in crop_types:
            folder = crop_folder(data_dir, dataset_key(spec.name, dir_name), crop_type, ratio)
            result = crop_dataset(dataset, folder, split, crop_type, ratio, seed,
                                  num_workers, jpeg_quality, progress)
            summary[f"{folder.name}/{split}"] = result
    return summary
