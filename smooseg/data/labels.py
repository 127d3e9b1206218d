"""Label files: single-channel id maps (PNG and other lossless formats) and MATLAB arrays,
read with one-line errors naming the file."""

import numpy as np
import scipy.io
from PIL import Image

from smooseg.errors import SmoosegError
from smooseg.io import pixel_limit_error, to_uint8

LABEL_RULE = "a label file is a single-channel image of class ids (mode L, P or I;16), the size of its image"
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def single_channel(mode):
    """Whether a PIL mode holds one integer channel (a label map), not colours."""
    return mode in ("L", "P", "1", "I") or mode.startswith("I;16")


def _bad_mode(path, mode, rule):
    return SmoosegError(f"label {path} has mode {mode}, not a single-channel id map; {rule}; save "
                        "the class ids as a greyscale (mode L) PNG")


def _unreadable_label(path, err):
    if isinstance(err, Image.DecompressionBombError):
        return pixel_limit_error(path, err)
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    return SmoosegError(f"cannot read label {path} ({reason}); the file is corrupt: "
                        "re-download it or remove it from the data set")


def label_header(path, rule=LABEL_RULE):
    """(width, height) of a label file from its header; SmoosegError unless it is single-channel."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
    except _PIL_ERRORS as err:
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
    except _PIL_ERRORS as err:
        raise _unreadable_label(path, err) from None


def _mat_contents(path, key, read):
    """``read(path)`` as a dict of arrays (or shapes) holding ``key``; one-line errors naming the file."""
    try:
        contents = read(path)
    except Exception as err:  # noqa: BLE001 - scipy raises several unrelated types for broken files
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


def mat_rgb(array, path):
    """First three channels of an ``img`` array as uint8 RGB, scaled by bit depth
    (:func:`smooseg.io.to_uint8`: floats in [0, 1] x255, 16-bit integers /257)."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise SmoosegError(f"{path}: 'img' has shape {array.shape}; expected H x W x >=3 (RGB)")
    return to_uint8(array[..., :3])
