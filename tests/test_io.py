"""Files the package writes (atomic, with the user's permissions) and the one image reader."""

import os
import stat
import sys

import numpy as np
import pytest
from PIL import Image

from smooseg.errors import SmoosegError
from smooseg.io import atomic_write, current_umask, image_size, read_rgb, to_uint8, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_new_files_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    write_json({"a": 1}, tmp_path / "sub" / "metrics.json")
    with atomic_write(tmp_path / "picture.png") as tmp:
        assert mode(tmp) == 0o600                # private while half-written
        Image.new("L", (2, 2)).save(tmp, format="PNG")
    assert mode(tmp_path / "sub" / "metrics.json") == expected
    assert mode(tmp_path / "picture.png") == expected
    assert mode(tmp_path / "sub") == 0o777 & ~mask
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "shared.json"
    target.write_text("{}")
    os.chmod(target, 0o660)
    write_json({"b": 2}, target)
    assert mode(target) == 0o660 and '"b": 2' in target.read_text()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_to_uint8_scales_by_bit_depth():
    assert to_uint8(np.array([0, 255], np.uint8)).tolist() == [0, 255]
    assert to_uint8(np.array([0, 257, 32896, 65535], np.uint16)).tolist() == [0, 1, 128, 255]
    assert to_uint8(np.array([0, 200, 65535], np.int32)).tolist() == [0, 1, 255]  # 16-bit data as I
    assert to_uint8(np.array([0, 2**20], np.int32)).tolist() == [0, 255]          # wider: by maximum
    assert to_uint8(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 127, 255]
    assert to_uint8(np.array([-3.0, 100.0, np.nan], np.float32)).tolist() == [0, 100, 0]
    assert to_uint8(np.array([True, False])).tolist() == [255, 0]


@pytest.mark.parametrize("name,array,mode", [
    ("deep.png", np.full((4, 6), 40000, np.uint16), "I;16"),
    ("deep.tif", np.full((4, 6), 40000, np.int32), "I"),
    ("float.tif", np.full((4, 6), 0.6, np.float32), "F"),
    ("grey.png", np.full((4, 6), 156, np.uint8), "L"),
])
def test_read_rgb_of_every_bit_depth(tmp_path, name, array, mode):
    Image.fromarray(array).save(tmp_path / name)
    with Image.open(tmp_path / name) as img:
        assert img.mode == mode
    rgb = np.asarray(read_rgb(tmp_path / name))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb == {"I;16": 156, "I": 156, "F": 153, "L": 156}[mode]).all()   # 40000/257 = 155.6


def test_image_size_follows_exif_orientation_from_the_header(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8                                        # rotate 90 counter-clockwise
    Image.new("RGB", (30, 10)).save(tmp_path / "p.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "p.jpg") == (30, 10)
    assert (image_size(tmp_path / "p.jpg", exif=True) == (10, 30)
            == read_rgb(tmp_path / "p.jpg", exif=True).size)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(SmoosegError, match=r"cannot read image .*bad\.jpg"):
        image_size(tmp_path / "bad.jpg")


def test_atomic_write_flushes_the_file_and_its_folder_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    write_json({"a": 1}, tmp_path / "m.json")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".m.json.")) and events[2][1] == str(tmp_path)


def test_a_file_written_not_durable_is_renamed_into_place_without_a_flush(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    with atomic_write(tmp_path / "p.png", durable=False) as tmp:
        tmp.write_bytes(b"picture")
    assert events == ["replace"] and (tmp_path / "p.png").read_bytes() == b"picture"
    assert os.listdir(tmp_path) == ["p.png"]


def test_flush_to_disk_syncs_the_folders_file_system_else_everything(tmp_path, monkeypatch):
    from smooseg import io

    calls = []
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    monkeypatch.setattr(io, "_libc_syncfs", lambda: lambda fd: calls.append(("syncfs", os.readlink(
        f"/proc/self/fd/{fd}"))) or 0)
    io.flush_to_disk(tmp_path)
    assert calls == [("syncfs", str(tmp_path))]
    for syncfs in (None, lambda fd: -1):           # no syncfs in this C library, or it failed
        calls.clear()
        monkeypatch.setattr(io, "_libc_syncfs", lambda syncfs=syncfs: syncfs)
        io.flush_to_disk(tmp_path)
        assert calls == ["sync"]
    if sys.platform.startswith("linux"):
        monkeypatch.undo()
        assert io._libc_syncfs() is not None       # glibc has it: the real call runs below
        io.flush_to_disk(tmp_path)


@pytest.mark.parametrize("moment", ["created", "written", "renaming"])
def test_a_signal_at_any_moment_of_a_write_leaves_no_temporary_file(tmp_path, monkeypatch, moment):
    """A worker's SIGTERM (SystemExit) or Ctrl-C arrives between two Python steps: right after the
    temporary file is created, while it is written, or as it is renamed."""
    (tmp_path / "m.json").write_text("old")
    real = {"created": os.close, "renaming": os.replace}

    def interrupted(*args):
        real[moment](*args)
        raise KeyboardInterrupt

    if moment in real:
        monkeypatch.setattr(os, "close" if moment == "created" else "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "m.json") as tmp:
        tmp.write_text("new")
        if moment == "written":
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.json"]
    assert (tmp_path / "m.json").read_text() == ("new" if moment == "renaming" else "old")


def test_simulated_full_disk_keeps_the_previous_file(tmp_path):
    import errno

    target = tmp_path / "metrics.json"
    write_json({"old": 1}, target)
    with pytest.raises(SmoosegError) as err, atomic_write(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(f"no space left in {tmp_path}") and "\n" not in str(err.value)
    assert '"old": 1' in target.read_text() and os.listdir(tmp_path) == ["metrics.json"]
