"""User-facing errors and atomic file writing."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class SmoosegError(RuntimeError):
    """A problem the user can fix; the message is one line naming the thing and the fix."""


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
