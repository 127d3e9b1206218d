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


@contextmanager
def sigterm_stops(message):
    """While the block runs, SIGTERM ends it with :class:`Terminated` carrying ``message`` (what
    was kept and how to go on): the entry point prints it as its one line and exits with 143."""
    with sigterm_raises():
        try:
            yield
        except Terminated as err:
            raise Terminated(str(err) or message) from None


class SigtermLatch:
    """While used as a context manager, SIGTERM is only noted (``received``); the loop it guards
    calls :meth:`check` between its steps, which raises :class:`Terminated`. Nothing is raised in
    the middle of library code (a process pool's locks), so the cleanup that follows is safe."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _note(self, signum, frame):
        self.received = True

    def check(self, message=""):
        if self.received:
            raise Terminated(message)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._note)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = None
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _exit_terminated(signum, frame):
    raise SystemExit(TERMINATED_STATUS)


def worker_signals():
    """In a worker process: SIGTERM ends it quietly (SystemExit, so its ``finally`` blocks and
    temporary files are cleaned up; no traceback, no BrokenPipeError from a parent already gone)
    and Ctrl-C is left to the parent (SIGINT ignored: it reaches the whole process group)."""
    signal.signal(signal.SIGTERM, _exit_terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
