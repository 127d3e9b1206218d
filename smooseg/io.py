"""Files: writing without leaving anything half-written, JSON, and reading images.

Every image any part of the package reads (training, evaluation, segmentation, cropping) goes
through :func:`read_rgb`, so the same file gives the same pixels everywhere: fully decoded,
EXIF orientation applied when the reader asks for it, and converted to 8-bit RGB by bit depth
(16-bit and 32-bit greyscale, float images), see :func:`to_uint8`.
"""

import ctypes
import errno
import json
import os
import secrets
import stat
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from smooseg.errors import SmoosegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
EXIF_ORIENTATION = 0x0112
# EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def current_umask():
    """The process's umask, read without changing it where Linux reports it (``/proc``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def new_file_mode(path):
    """Permission bits a file written at ``path`` gets: those of the file it replaces, else what
    ``open()`` would give a new file (0666 minus the umask); never mkstemp's private 0600."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def fsync_file(path):
    """Flush the file at ``path`` to its disk (what was written through any handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder):
    """Flush a folder's entries (a rename into it) to its disk; file systems that cannot are let be."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, durable=True):
    """Yield a temporary path in ``path``'s own folder; when the block succeeds, flush it to disk
    (fsync) and rename it onto ``path``, then flush the folder.

    ``durable=False`` skips the two flushes (the rename is as atomic): for files written by the
    thousand (crops, pictures), where a flush each costs more than the write on network file
    systems. A set that a record calls complete (a crop split) is flushed once, before its record
    (:func:`flush_to_disk`); pictures are not flushed at all.

    The rename never crosses a file system (so it is atomic: a reader, or a kill at any moment,
    sees the old file or the new one, never part of one); a failed write (a full disk, an
    exception, a signal) removes the temporary file and leaves the previous ``path`` as it was.
    The finished file has the permissions of the file it replaces, or those the user's umask
    gives a new file (the temporary file is private while it is being written). A full or
    read-only folder is a SmoosegError naming it (:func:`disk_error`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(err, path.parent) or err from None
    # Named before it is made, so that a signal arriving at any moment from its creation on (a
    # worker's SIGTERM, Ctrl-C) finds the name to remove.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another writer's temporary file (one chance in 2**48): not ours
            tmp = None
            raise
        except OSError as err:
            raise disk_error(err, path.parent) or err from None
        yield tmp
        if durable:
            fsync_file(tmp)
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with suppress(OSError):  # never made (a read-only folder says EROFS, not ENOENT), or unremovable
                tmp.unlink()
        problem = disk_error(err, path.parent) if isinstance(err, OSError) else None
        if problem is not None:
            raise problem from None
        raise
    if durable:
        fsync_dir(path.parent)


def _libc_syncfs():
    """Linux's ``syncfs(fd)``, or None where the C library has none."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None


def flush_to_disk(folder):
    """Flush every file written so far on ``folder``'s file system to its disk, in one call (after
    a set of files written with ``atomic_write(..., durable=False)``, before the record that calls
    the set complete). Linux's ``syncfs`` touches that file system only (a busy or stalled NFS
    mount elsewhere on the node is not waited for); elsewhere, or if it fails, ``os.sync``."""
    syncfs = _libc_syncfs()
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


# errno values of a folder that takes no more data: no space, over quota, read-only file system
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS,)


def disk_error(err, folder, left="nothing was half-written"):
    """The one-line SmoosegError for ``err`` when it says ``folder`` is full or read-only, else
    None; ``left`` says what the failed write left behind."""
    code = getattr(err, "errno", None)
    if code in DISK_FULL:
        return SmoosegError(f"no space left in {folder} ({_reason(err)}): free space there (or raise "
                            f"your quota), or write to another folder; {left}")
    if code in READ_ONLY:
        return SmoosegError(f"{folder} is on a read-only file system: write to another folder (a "
                            f"different output_dir / data_dir / cache.dir); {left}")
    return None


def write_json(data, path):
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def to_uint8(array):
    """An image array (H×W or H×W×C) as uint8, scaled by its bit depth.

    uint8 as is; bool ×255; 16-bit integers ÷257 (65535 -> 255); wider integers (PIL mode ``I``,
    what 16-bit PNGs and 32-bit TIFFs may open as) ÷257 while they fit 16 bits, else scaled by
    their maximum (integers are rounded); floats: [0, 1] ×255, [0, 255] as is, [0, 65535] ÷257,
    else scaled by their maximum, then truncated (NaN -> 0). Negative values become 0.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        values = array.astype(np.int64)
        top = int(values.max()) if values.size else 0
        scale = 257.0 if (array.dtype.itemsize == 2 or top <= 65535) else max(top, 1) / 255.0
        return np.clip(np.round(np.clip(values, 0, None) / scale), 0, 255).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max()) if values.size else 0.0
    if top <= 1.0:
        values = values * 255.0
    elif top > 255.0:
        values = values / (257.0 if top <= 65535.0 else top / 255.0)
    return np.clip(values, 0, 255).astype(np.uint8)  # truncated, as the Potsdam reader always did


def to_rgb(img):
    """A PIL image of any mode as 8-bit RGB. Modes PIL converts correctly (L, P, 1, RGBA, CMYK,
    YCbCr, LA, ...) go through ``convert``; high-bit-depth modes (``I;16*``, ``I``, ``F``), which
    ``convert`` clips to white, are scaled by bit depth with :func:`to_uint8`."""
    if img.mode.startswith("I") or img.mode == "F":
        grey = to_uint8(np.asarray(img))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    return img.convert("RGB")


def _reason(err):
    return " ".join(str(err).split())[:160] or type(err).__name__


# Environment variable that raises Pillow's decompression-bomb limit (pixels; "none": no limit).
PIXEL_LIMIT_ENV = "SMOOSEG_MAX_IMAGE_PIXELS"


def apply_pixel_limit(environ=os.environ):
    """Set Pillow's pixel limit from :data:`PIXEL_LIMIT_ENV` when it holds a whole number or
    ``none`` (other values are reported by :func:`pixel_limit_error`)."""
    value = environ.get(PIXEL_LIMIT_ENV, "").strip().lower()
    if value == "none":
        Image.MAX_IMAGE_PIXELS = None
    elif value.isdigit():
        Image.MAX_IMAGE_PIXELS = int(value)


def pixel_limit_error(path, err):
    """The one message for an image over Pillow's pixel limit: the limit, and how to raise it."""
    value = os.environ.get(PIXEL_LIMIT_ENV)
    ignored = (f" ({PIXEL_LIMIT_ENV}={value} was ignored: not a whole number or none)"
               if value and value.strip().lower() != "none" and not value.strip().isdigit() else "")
    return SmoosegError(f"image {path} is too large for Pillow's safety limit of {Image.MAX_IMAGE_PIXELS} "
                        f"pixels ({_reason(err)}){ignored}; if you trust the file, allow it with "
                        f"{PIXEL_LIMIT_ENV}=<pixels> (or none) in the environment, or downscale it")


apply_pixel_limit()


def _unreadable(path, err, fix):
    if isinstance(err, Image.DecompressionBombError):
        return pixel_limit_error(path, err)
    return SmoosegError(f"cannot read image {path} ({_reason(err)}); the file is corrupt or not an "
                        f"image: {fix}")


def exif_orientation(img):
    """The EXIF orientation (1-8) of an opened image, from its header only (1 when it has none).

    PNG keeps EXIF in an ``eXIf`` chunk; only one before the pixel data is seen here (PIL would
    decode the whole image to look further), which is where writers put it.
    """
    try:
        if img.format == "PNG":
            data = img.info.get("exif")
            if not data:
                return 1
            exif = Image.Exif()
            exif.load(data)
        else:
            exif = img.getexif()
        value = int(exif.get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block: PIL's exif_transpose ignores it too
        return 1
    return value if 1 <= value <= 8 else 1


def image_size(path, exif=False, fix="re-download it or remove it from the data set"):
    """(width, height) of an image file from its header, after its EXIF orientation with
    ``exif`` (what :func:`read_rgb` will return), without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if exif and exif_orientation(img) in SWAPPING_ORIENTATIONS:
                width, height = height, width
            return width, height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err, fix) from None


def read_rgb(path, exif=False, fix="re-download it or remove it from the data set"):
    """A fully decoded 8-bit RGB PIL image (so a corrupt file fails here, by name); ``exif``
    applies the file's EXIF orientation; any bit depth is scaled to 8 bits (:func:`to_rgb`).
    The error names the file and ``fix``."""
    try:
        with Image.open(path) as img:
            img.load()
            if exif:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err, fix) from None


# ---- paths the user names: checked before anything is read or written, one line each

def check_output_dir(path, key="output_dir"):
    """Check that ``path`` (the value of config key ``key``) can be a folder this run writes into,
    without creating it; returns it as a Path.

    A SmoosegError names ``key`` when ``path`` is an existing file, when a part of it is a file
    (so it cannot be created) or when the folder (or its nearest existing parent, where it would
    be created) does not take a new file: a probe file is created there and removed, so a
    read-only file system or mount counts too (mode bits alone do not stop root).
    """
    path = Path(path).expanduser()
    fix = f"pass {key}=<a folder you can write to>"
    if path.exists() and not path.is_dir():
        raise SmoosegError(f"{key}={path} is an existing file, not a folder; {fix}")
    parent = path
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SmoosegError(f"{key}={path} cannot be created: {parent} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".smooseg-write-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if parent == path else f" (it would be created in {parent})"
        raise SmoosegError(f"{key}={path} is not writable{where}: {_reason(err)}; {fix}") from None
    return path


def check_input_file(path, key, fix="pass the path of an existing file", missing="does not exist",
                     label=None):
    """Check that ``path`` (named by config key ``key``) is an existing, readable file (not a
    folder); returns it as a Path. The error starts with ``label`` (default ``<key>=<path>``),
    then says what is wrong and ``fix``."""
    path = Path(path).expanduser()
    label = f"{key}={path}" if label is None else label
    if not path.exists():
        raise SmoosegError(f"{label} {missing}; {fix}")
    if path.is_dir():
        raise SmoosegError(f"{label} is a folder, not a file; {fix}")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise SmoosegError(f"{label} cannot be read ({_reason(err)}); {fix}") from None
    return path


def check_input_dir(path, key, fix="pass an existing folder"):
    """Check that ``path`` (named by config key ``key``) is an existing folder; returns it as a Path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SmoosegError(f"{key}={path} does not exist; {fix}")
    if not path.is_dir():
        raise SmoosegError(f"{key}={path} is a file, not a folder; {fix}")
    return path
