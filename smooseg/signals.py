"""SIGTERM as an exception: what a scheduler sends to stop a job, turned into ``Terminated`` so
the code it interrupts cleans up as it does for Ctrl-C (pools are killed and joined, temporary
files removed) and the entry point ends with one line and status 143."""

import signal
from contextlib import contextmanager

TERMINATED_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so every ``except KeyboardInterrupt`` cleanup (the
    CRF pool, DataLoader workers) runs for it too; never caught by ``except Exception``."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_raises():
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread; the previous
    handler is restored afterwards. Outside the main thread it changes nothing."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_terminated(signum, frame):
    raise SystemExit(TERMINATED_STATUS)


def worker_signals():
    """In a worker process: SIGTERM ends it quietly (SystemExit, so its ``finally`` blocks and
    temporary files are cleaned up; no traceback, no BrokenPipeError from a parent already gone)
    and Ctrl-C is left to the parent (SIGINT ignored: it reaches the whole process group)."""
    signal.signal(signal.SIGTERM, _exit_terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
