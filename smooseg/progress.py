"""Progress bars that suit where the output goes: tqdm's bar on a terminal; in a file or a pipe
(a SLURM log, ``> run.log``) a plain line now and then and one at the end, never a
carriage-return update. Training's own progress is :mod:`smooseg.train.progress`."""

import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # seconds between two plain lines


class _WholeLines:
    """A stream that passes on whole lines only (tqdm's lone closing newline is dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip():
            self.stream.write(text)

    def flush(self):
        self.stream.flush()


class PlainLines(tqdm):
    """tqdm that writes its status as a whole line, at most every ``PLAIN_INTERVAL_S`` seconds,
    plus the first and the last."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mininterval", PLAIN_INTERVAL_S)
        kwargs["file"] = _WholeLines(kwargs.get("file") or sys.stderr)
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        line = (str(self) if msg is None else msg).strip()
        if line:
            self.fp.write(line + "\n")
            self.fp.flush()
        return True


def progress_bar(*args, **kwargs):
    """``tqdm(*args, **kwargs)`` when its stream (``file``, else stderr) is a terminal, else
    :class:`PlainLines` with the same arguments."""
    stream = kwargs.get("file") or sys.stderr
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    return (tqdm if interactive else PlainLines)(*args, **kwargs)
