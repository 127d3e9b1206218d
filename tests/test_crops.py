"""Five/random crop writer: geometry, count, label + 1 round trip, resume after interruption."""

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smooseg.data import crops
from smooseg.data.crops import crop_dataset, crop_folder, five_crops, random_crops, remove_stale_temps
from smooseg.data.datasets import build_dataset
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout
from smooseg.errors import SmoosegError

REPO = Path(__file__).resolve().parents[1]


def finished(folder, split="train"):
    return (sorted(p.name for p in (folder / "img" / split).iterdir()),
            sorted(p.name for p in (folder / "label" / split).iterdir()))


def contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def record(folder):
    return json.loads((folder / "complete.json").read_text())


def test_five_crops_by_hand():
    assert five_crops(10, 20, 0.5) == [(0, 0, 5, 10), (0, 10, 5, 10), (5, 0, 5, 10),
                                       (5, 10, 5, 10), (2, 5, 5, 10)]   # centre round(2.5) = 2
    assert five_crops(7, 7, 0.5)[4] == (2, 2, 3, 3)                    # int(3.5) = 3 sides


def test_random_crops_bounds_and_seed():
    boxes = random_crops(30, 50, 0.5, np.random.default_rng(0), n=200)
    assert all((h, w) == (15, 25) and 0 <= t <= 15 and 0 <= left <= 25 for t, left, h, w in boxes)
    assert {t for t, _, _, _ in boxes} == set(range(16))                # all corners reachable
    again = random_crops(30, 50, 0.5, np.random.default_rng(0), n=200)
    assert boxes == again


@pytest.mark.parametrize("crop_type", ["five", "random"])
def test_crops_count_geometry_and_label_round_trip(tmp_path, crop_type):
    write_cityscapes_layout(tmp_path, n_train=3, n_val=1, size=(32, 48))
    source = build_dataset("cityscapes", tmp_path, "train", res=None, crop="none")
    folder = crop_folder(tmp_path, "cityscapes", crop_type, 0.5)
    assert folder == tmp_path / "cropped" / f"cityscapes_{crop_type}_crop_0.5"
    result = crop_dataset(source, folder, "train", crop_type, 0.5, seed=4, progress=False)
    assert result == {"written": 30, "images": 3}
    items = [source.item_name(i) for i in range(3)]
    images, labels = finished(folder)
    assert images == sorted(f"{item}_{n}.jpg" for item in items for n in range(5))
    assert labels == sorted(f"{item}_{n}.png" for item in items for n in range(5))
    cropped = build_dataset("cityscapes", tmp_path, "train", res=None, crop="none",
                            crop_source={"crop_type": crop_type, "ratio": 0.5})
    assert len(cropped) == 15
    for i, item in enumerate(items):
        image, label = source.load_raw(i)
        boxes = crops.crop_boxes(crop_type, 32, 48, 0.5, 4, item)
        for n, (top, left, h, w) in enumerate(boxes):
            crop_image, crop_label = cropped.load_raw(5 * i + n)
            assert cropped.item_name(5 * i + n) == f"{item}_{n}"
            assert crop_image.size == (24, 16) == (w, h)
            assert np.array_equal(crop_label, label[top:top + h, left:left + w])
            stored = np.asarray(Image.open(folder / f"label/train/{item}_{n}.png"))
            assert np.array_equal(stored, label[top:top + h, left:left + w] + 1)
            encoded = io.BytesIO()
            image.crop((left, top, left + w, top + h)).save(encoded, format="JPEG", quality=75)
            assert (folder / f"img/train/{item}_{n}.jpg").read_bytes() == encoded.getvalue()
    item = build_dataset("cityscapes", tmp_path, "train", res=16,
                         crop_source={"crop_type": crop_type, "ratio": 0.5})[7]
    assert item["img"].shape == (3, 16, 16) and item["name"] == f"{items[1]}_2"


def test_unlabelled_directory_crops_are_all_ignore(tmp_path):
    write_directory_layout(tmp_path, name="bare", n_train=2, n_val=1, size=(20, 20),
                           with_labels=False)
    summary = crops.crop_datasets(tmp_path, ["directory"], ["train"], ["five"], 0.5,
                                  dir_name="bare", n_classes=3, progress=False)
    assert summary == {"bare_five_crop_0.5/train": {"written": 20, "images": 2}}
    ds = build_dataset("directory", tmp_path, "train", res=None, n_classes=3, dir_name="bare",
                       crop_source={"crop_type": "five", "ratio": 0.5})
    assert len(ds) == 10 and (ds.load_raw(9)[1] == -1).all()


def test_resume_after_interruption_leaves_no_partial_file(tmp_path, monkeypatch):
    write_cityscapes_layout(tmp_path / "clean", n_train=4, n_val=1, size=(32, 48))
    write_cityscapes_layout(tmp_path / "cut", n_train=4, n_val=1, size=(32, 48))
    for name in ("clean", "cut"):
        assert (tmp_path / name / "cityscapes").is_dir()
    clean = build_dataset("cityscapes", tmp_path / "clean", "train", res=None)
    clean_folder = crop_folder(tmp_path / "clean", "cityscapes", "random", 0.5)
    crop_dataset(clean, clean_folder, "train", "random", 0.5, seed=9, progress=False)

    cut = build_dataset("cityscapes", tmp_path / "cut", "train", res=None)
    folder = crop_folder(tmp_path / "cut", "cityscapes", "random", 0.5)
    real_atomic_write = crops.atomic_write
    calls = {"n": 0}

    def dying_atomic_write(path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:       # die half-way through writing the 13th file
            class Boom(Exception):
                pass
            context = real_atomic_write(path, **kwargs)
            tmp = context.__enter__()
            tmp.write_bytes(b"half a jpeg")
            context.__exit__(Boom, Boom(), None)
            raise KeyboardInterrupt
        return real_atomic_write(path, **kwargs)

    monkeypatch.setattr(crops, "atomic_write", dying_atomic_write)
    with pytest.raises(KeyboardInterrupt):
        crop_dataset(cut, folder, "train", "random", 0.5, seed=9, progress=False)
    images, labels = finished(folder)
    assert len(images) + len(labels) == 12 and not list(folder.rglob("*.tmp"))
    for name in images:                        # every finished file decodes fully
        Image.open(folder / "img/train" / name).load()

    (folder / "img/train/.17.jpg.killed.tmp").write_bytes(b"left by kill -9")
    monkeypatch.setattr(crops, "atomic_write", real_atomic_write)
    result = crop_dataset(cut, folder, "train", "random", 0.5, seed=9, progress=False)
    assert result["written"] == 40 - 12
    assert not list(folder.rglob("*.tmp"))
    assert contents(folder) == contents(clean_folder)     # same crops (and record), byte for byte
    assert crop_dataset(cut, folder, "train", "random", 0.5, seed=9,
                        progress=False)["written"] == 0


def test_completion_record_is_written_last_and_checked(tmp_path, monkeypatch):
    write_cityscapes_layout(tmp_path, n_train=3, n_val=1, size=(32, 48))
    source = build_dataset("cityscapes", tmp_path, "train", res=None)
    folder = crop_folder(tmp_path, "cityscapes", "random", 0.5)
    order = []
    real_write_json = crops.write_json

    def spy(data, path):
        order.append((len(os.listdir(folder / "img/train")) if (folder / "img/train").is_dir() else 0,
                      sorted(data["splits"])))
        return real_write_json(data, path)

    monkeypatch.setattr(crops, "write_json", spy)
    monkeypatch.setattr(crops, "flush_to_disk", lambda where: order.append(("flushed", where)))
    crop_dataset(source, folder, "train", "random", 0.5, seed=4, progress=False)
    # settings first; the crops flushed to disk once, then the split's counts after all of them
    assert order == [(0, []), ("flushed", folder), (15, ["train"])]
    listing = {name: [image.stat().st_size, label.stat().st_size] for name, image, label in source.entries}
    assert record(folder) == {"format": 2, "crop_type": "random", "ratio": 0.5, "jpeg_quality": 75, "seed": 4,
                              "splits": {"train": {"source_images": 3, "crops": 15, "items": listing}}}
    crop_source = {"crop_type": "random", "ratio": 0.5}
    assert len(build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=crop_source)) == 15
    # a resume must use the settings the set was started with
    with pytest.raises(SmoosegError, match=r"started with seed=4 \(complete.json\) but this run asks for "
                                           r"seed=5; pass seed=4 to finish it, or delete"):
        crop_dataset(source, folder, "train", "random", 0.5, seed=5, progress=False)
    with pytest.raises(SmoosegError, match="jpeg_quality=75 .* asks for jpeg_quality=90"):
        crop_dataset(source, folder, "train", "random", 0.5, seed=4, jpeg_quality=90, progress=False)
    # a refused resume leaves the finished split readable
    assert len(build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=crop_source)) == 15
    # crops of an earlier, larger data set are not silently mixed in
    Image.new("RGB", (4, 4)).save(folder / "img/train/holiday.jpg")
    with pytest.raises(SmoosegError, match=r"holds 1 files that are not crops of the 3 source images "
                                           r"\(e\.g\. holiday\.jpg"):
        crop_dataset(source, folder, "train", "random", 0.5, seed=4, progress=False)
    with pytest.raises(SmoosegError, match="is incomplete: it has no completion entry for split train"):
        build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=crop_source)
    # the random set's seed is part of the command that finishes it
    with pytest.raises(SmoosegError, match=r"crop_types=\[random\] crop_ratio=0.5 seed=4`"):
        build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=crop_source)


def test_crops_are_not_flushed_one_by_one_and_an_empty_crop_is_rewritten(tmp_path, monkeypatch):
    """A flush per crop (two fsyncs) costs more than the crop on network file systems: the set is
    flushed once, before its record. A crop that came back empty (renamed but never on disk when
    the power went) counts as missing on the next run."""
    write_cityscapes_layout(tmp_path, n_train=2, n_val=1, size=(32, 48))
    source = build_dataset("cityscapes", tmp_path, "train", res=None)
    folder = crop_folder(tmp_path, "cityscapes", "five", 0.5)
    fsyncs, syncs = [], []
    real_fsync, real_flush = os.fsync, crops.flush_to_disk
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(crops, "flush_to_disk", lambda where: syncs.append(len(fsyncs)) or real_flush(where))
    assert crop_dataset(source, folder, "train", "five", 0.5, progress=False)["written"] == 20
    assert not [path for path in fsyncs if path.endswith((".jpg", ".png")) or "/img/" in path
                or "/label/" in path]
    assert syncs == [2]                  # once, after the settings record (file + folder), before the last
    assert len(fsyncs) == 4              # ... record: two records, each flushed with its folder
    first = sorted((folder / "img/train").iterdir())[0]
    whole = first.read_bytes()
    first.write_bytes(b"")
    assert crop_dataset(source, folder, "train", "five", 0.5, progress=False)["written"] == 1
    assert first.read_bytes() == whole


def test_remove_stale_temps_only_touches_temp_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/.3.jpg.abc.tmp").write_bytes(b"x")
    (tmp_path / "img/3.jpg").write_bytes(b"y")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in (tmp_path / "img").iterdir()] == ["3.jpg"]


def test_bad_crop_settings(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=1, n_val=1, size=(16, 16))
    ds = build_dataset("cityscapes", tmp_path, "train", res=None)
    with pytest.raises(SmoosegError, match="unknown crop type 'six'"):
        crop_dataset(ds, tmp_path / "c", "train", "six", 0.5, progress=False)
    with pytest.raises(SmoosegError, match="crop_ratio=1.5"):
        crop_dataset(ds, tmp_path / "c", "train", "five", 1.5, progress=False)


def run_cli(args, cwd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "crop_datasets.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.slow
def test_cli_parallel_both_flag_styles_and_clean_cwd(tmp_path, entry_point):
    data = write_cityscapes_layout(tmp_path / "data", n_train=4, n_val=2, size=(32, 48))
    work = tmp_path / "cwd"
    work.mkdir()
    default = entry_point("crop_datasets.py", "--data_dir", data, "--num_workers", "2", cwd=work)
    assert default.returncode == 2 and "cocostuff" in default.stderr  # default: cityscapes + cocostuff27
    assert not (data / "cropped").exists()  # every data set is checked before anything is written
    out = run_cli(["--data_dir", str(data), "--num_workers", "2", "--splits", "[train,val]",
                   "--datasets", "[cityscapes]"], work)
    assert out.returncode == 0, out.stderr
    assert "cityscapes_five_crop_0.5/train: 4 images, 40 files written" in out.stdout
    folder = data / "cropped/cityscapes_five_crop_0.5"
    assert [len(x) for x in finished(folder, "val")] == [10, 10]
    assert list(work.iterdir()) == []                            # no outputs/, no log file
    again = run_cli([f"data_dir={data}", "datasets=[cityscapes]", "crop_types=[five,random]",
                     "progress=false"], work)
    assert again.returncode == 0, again.stderr
    assert "cityscapes_five_crop_0.5/train: 4 images, 0 files written" in again.stdout
    assert "cityscapes_random_crop_0.5/train: 4 images, 40 files written" in again.stdout
    bad = entry_point("crop_datasets.py", f"data_dir={tmp_path / 'missing'}", cwd=work)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: data_dir ")


@pytest.mark.slow
def test_cli_killed_mid_way_then_resumed(tmp_path):
    data = write_cityscapes_layout(tmp_path, n_train=60, n_val=1, size=(64, 128))
    folder = data / "cropped/cityscapes_five_crop_0.5"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "crop_datasets.py"), f"data_dir={data}", "datasets=[cityscapes]",
         "num_workers=0"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if (folder / "label/train").is_dir() and len(os.listdir(folder / "label/train")) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(os.listdir(folder / "img/train"))
    assert done < 300, "the run finished before it could be killed; grow the data set"
    # the part-written set is refused, with the command that finishes it ...
    with pytest.raises(SmoosegError) as err:
        build_dataset("cityscapes", data, "train", res=None,
                      crop_source={"crop_type": "five", "ratio": 0.5})
    message = str(err.value)
    assert f"the cropped training set {folder} is incomplete" in message
    command = message.split("`")[1]
    assert command == (f"python crop_datasets.py data_dir={data} datasets=[cityscapes] crop_types=[five] "
                       "crop_ratio=0.5")
    # ... and that command, as printed, finishes it
    out = run_cli(shlex.split(command)[2:] + ["progress=false"], tmp_path)
    assert out.returncode == 0, out.stderr
    entry = record(folder)["splits"]["train"]
    assert (entry["source_images"], entry["crops"], len(entry["items"])) == (60, 300, 60)
    assert not list(folder.rglob("*.tmp"))
    images, labels = finished(folder)
    assert len(images) == len(labels) == 300
    ds = build_dataset("cityscapes", data, "train", res=None,
                       crop_source={"crop_type": "five", "ratio": 0.5})
    for n in range(300):
        image, label = ds.load_raw(n)
        assert image.size == (64, 32) and label.shape == (32, 64)


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_cli_files_get_the_users_umask(tmp_path, mask):
    """Crops and the completion record are readable as the user's umask says (a lab group can read
    them), not mkstemp's private 0600."""
    data = write_cityscapes_layout(tmp_path / "data", n_train=2, n_val=1, size=(32, 48))
    out = run_cli([f"data_dir={data}", "datasets=[cityscapes]", "num_workers=0", "progress=false"],
                  tmp_path, preexec_fn=lambda: os.umask(mask))
    assert out.returncode == 0, out.stderr
    folder = data / "cropped/cityscapes_five_crop_0.5"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 22 and {folder / "complete.json", folder / ".lock"} <= set(files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
    assert {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_dir()} == {oct(0o777 & ~mask)}


def _add_scene(data, like, name):
    """Add a source image (and its label) to the synthetic Cityscapes train split: a copy of
    ``like``'s pair under the new name ``name``, with one pixel changed so its size differs."""
    city = "synthburg"
    image = np.asarray(Image.open(like)).copy()
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(data / f"cityscapes/leftImg8bit/train/{city}/{name}_leftImg8bit.png")
    label = like.parent.parent.parent.parent / "gtFine/train" / like.parent.name / like.name.replace(
        "_leftImg8bit.png", "_gtFine_labelIds.png")
    Image.open(label).save(data / f"cityscapes/gtFine/train/{city}/{name}_gtFine_labelIds.png")


def test_stale_set_is_refused_and_a_rerun_updates_it_without_shifting_crops(tmp_path):
    data = write_cityscapes_layout(tmp_path, n_train=3, n_val=1, size=(32, 48))
    crop_source = {"crop_type": "random", "ratio": 0.5}
    folder = crop_folder(data, "cityscapes", "random", 0.5)
    crops.crop_datasets(data, ["cityscapes"], ["train"], ["random"], 0.5, seed=2, progress=False)
    before = contents(folder)
    images = sorted((data / "cityscapes/leftImg8bit/train").glob("*/*.png"))
    _add_scene(data, images[0], "aaa_000000_000001")        # sorts first: would shift every position
    with pytest.raises(SmoosegError) as err:
        build_dataset("cityscapes", data, "train", res=None, crop_source=crop_source)
    message = str(err.value)
    assert f"the cropped training set {folder} is stale: its source images changed since it was cut " \
           "(1 added (e.g. aaa_000000_000001)); update it with `python crop_datasets.py" in message
    assert "crop_types=[random] crop_ratio=0.5 seed=2`" in message
    result = crops.crop_datasets(data, ["cityscapes"], ["train"], ["random"], 0.5, seed=2, progress=False)
    assert result["cityscapes_random_crop_0.5/train"] == {"written": 10, "images": 4}
    after = contents(folder)
    assert {k: v for k, v in after.items() if k in before and k.name != "complete.json"} == \
        {k: v for k, v in before.items() if k.name != "complete.json"}        # old crops untouched
    assert len(build_dataset("cityscapes", data, "train", res=None, crop_source=crop_source)) == 20

    replaced = images[1]
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(replaced)           # same name, new content
    with pytest.raises(SmoosegError, match=r"is stale: .*\(1 replaced \(e\.g\. "):
        build_dataset("cityscapes", data, "train", res=None, crop_source=crop_source)
    result = crops.crop_datasets(data, ["cityscapes"], ["train"], ["random"], 0.5, seed=2, progress=False)
    assert result["cityscapes_random_crop_0.5/train"]["written"] == 10
    stem = replaced.name[: -len("_leftImg8bit.png")]
    assert np.asarray(Image.open(folder / f"img/train/{stem}_0.jpg")).max() < 16   # cut from the new image

    images[2].unlink()
    gone = images[2].name[: -len("_leftImg8bit.png")]
    (data / "cityscapes/gtFine/train" / images[2].parent.name / f"{gone}_gtFine_labelIds.png").unlink()
    with pytest.raises(SmoosegError, match=rf"is stale: .*\(1 removed \(e\.g\. {gone}\)\)"):
        build_dataset("cityscapes", data, "train", res=None, crop_source=crop_source)
    result = crops.crop_datasets(data, ["cityscapes"], ["train"], ["random"], 0.5, seed=2, progress=False)
    assert result["cityscapes_random_crop_0.5/train"]["written"] == 0
    assert not list(folder.glob(f"*/train/{gone}_*"))
    assert len(build_dataset("cityscapes", data, "train", res=None, crop_source=crop_source)) == 15


def test_two_crop_runs_into_one_set_at_once_do_not_clash(tmp_path):
    """A second run waits for the one writing the set (here: this test, holding its lock with a
    temporary file in flight) instead of deleting its temporary files, then finishes the set."""
    data = write_cityscapes_layout(tmp_path, n_train=4, n_val=1, size=(32, 48))
    folder = crop_folder(data, "cityscapes", "five", 0.5)
    in_flight = folder / "img/train/.x_0.jpg.abc.tmp"
    with crops.set_lock(folder):
        in_flight.parent.mkdir(parents=True)
        in_flight.write_bytes(b"being written")
        second = subprocess.Popen(
            [sys.executable, str(REPO / "crop_datasets.py"), f"data_dir={data}", "datasets=[cityscapes]",
             "num_workers=0", "progress=false"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        line = second.stderr.readline()
        assert line.startswith(f"waiting for another crop_datasets.py run writing {folder}"), line
        time.sleep(0.5)
        assert in_flight.read_bytes() == b"being written" and second.poll() is None
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "cityscapes_five_crop_0.5/train: 4 images, 40 files written" in out
    assert not list(folder.rglob("*.tmp"))
    assert len(build_dataset("cityscapes", data, "train", res=None,
                             crop_source={"crop_type": "five", "ratio": 0.5})) == 20


def test_source_names_that_cannot_name_a_crop_are_refused(tmp_path):
    from smooseg.data.cropped import source_listing

    image = tmp_path / "a.png"
    image.write_bytes(b"12345")
    assert source_listing([("a", image, None)]) == {"a": [5, None]}
    for bad in ("../a", ".hidden", ""):
        with pytest.raises(SmoosegError,
                           match=f"has the name '{re.escape(bad)}', which cannot name a crop file"):
            source_listing([(bad, image, None)])
    with pytest.raises(SmoosegError, match="two source images are both named 'a'"):
        source_listing([("a", image, None), ("a", image, None)])
