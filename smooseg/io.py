"""Files: writing without leaving anything half-written, JSON, and reading images."""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps

from smooseg.errors import SmoosegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data, path):
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def read_rgb(path, exif=False, fix="re-download it or remove it from the data set"):
    """A fully decoded RGB PIL image (so a corrupt file fails here, by name); ``exif`` applies the
    file's EXIF orientation. The error names the file and ``fix``."""
    try:
        with Image.open(path) as img:
            img.load()
            if exif:
                img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise SmoosegError(f"cannot read image {path} ({reason}); the file is corrupt or not an image: "
                           f"{fix}") from None
