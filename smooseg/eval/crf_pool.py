"""A reusable, pipelined process pool for the pydensecrf dense CRF (:mod:`smooseg.eval.crf`).

Evaluation submits batch n's CRF jobs and goes on with batch n+1 through the network while the
workers (nice +10, one torch thread each) run them; results come back in order.

Workers never outlive the process that started them: on Linux the kernel kills each one when
its parent dies (``PR_SET_PDEATHSIG``, set in the worker initializer; the pool must be used from
one thread that outlives it, which it has to be anyway: it is not thread-safe), and on every OS
a watchdog thread in the worker exits when its parent process is gone. Workers ignore SIGINT
(Ctrl-C in a terminal reaches the whole process group): the parent alone handles the interrupt,
and a KeyboardInterrupt while it waits for the pool, or closing the pool while jobs still run,
kills the workers at once instead of waiting for their jobs.
"""

import collections
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from smooseg.errors import SmoosegError
from smooseg.eval.crf import _as_float32_numpy, _as_uint8_hwc, dense_crf, dense_crf_labels

WORKER_NICENESS = 10
PARENT_POLL_S = 0.5     # how often a worker's watchdog checks that its parent is alive
PR_SET_PDEATHSIG = 1    # linux/prctl.h
JOIN_TIMEOUT_S = 5.0    # closing never waits longer than this for killed workers to be reaped


def die_with_parent(parent_pid, poll_s=PARENT_POLL_S, use_prctl=True):
    """Make this process exit when process ``parent_pid`` (its parent) dies: at once on Linux (the
    kernel sends SIGKILL, ``PR_SET_PDEATHSIG``), and within ``poll_s`` seconds everywhere (a
    daemon thread polling ``os.getppid()``, which changes when the parent is gone)."""
    if use_prctl and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the above took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="crf-parent-watchdog", daemon=True).start()


def _init_worker(parent_pid=None):
    """Tie the worker's life to its parent's (:func:`die_with_parent`), leave Ctrl-C to the parent
    (SIGINT ignored), keep each worker single-threaded so N workers do not oversubscribe the CPU,
    and below the main process's priority (nice +10) so the network that feeds the pool is not
    starved by it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        die_with_parent(parent_pid)
    torch.set_num_threads(1)
    if hasattr(os, "nice"):
        os.nice(WORKER_NICENESS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


MAX_AUTO_WORKERS = 32  # each worker holds its own torch import (~0.3 GB resident)


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(num_workers):
    """``auto`` -> one CRF worker per available core (at most 32); an integer >= 0 as is."""
    if num_workers == "auto":
        return min(available_cores(), MAX_AUTO_WORKERS)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise SmoosegError(f"crf_workers must be an integer >= 0 or auto, got {num_workers!r}; "
                           "e.g. crf_workers=auto")
    return num_workers


class CRFHandle:
    """A submitted batch; ``result()`` blocks until every image of it is done, in order."""

    def __init__(self, pool, futures=None, results=None):
        self._pool = pool
        self._futures = futures
        self._results = results

    def done(self):
        return self._results is not None or all(f.done() for f in self._futures)

    def result(self):
        if self._results is None:
            self._results = self._pool._gather(self._futures)
            self._futures = None
        return self._results


class CRFPool:
    """Dense CRF over batches, in-process (``num_workers=0``) or in a reusable spawn process pool
    (``num_workers=auto``: one worker per available core, see :func:`resolve_workers`).

    ``submit`` returns at once (at most ``max_in_flight`` batches outstanding; beyond that it waits
    on the oldest), so the caller can compute the next batch while workers run the CRF.
    A dead worker, or no CRF job finishing for ``timeout`` seconds, raises SmoosegError and closes
    the pool; a KeyboardInterrupt while waiting kills the workers and propagates. Not thread-safe:
    use one pool from one thread (which outlives it: on Linux the workers die with the thread that
    started them).
    """

    def __init__(self, num_workers=0, timeout=120.0, max_in_flight=4):
        num_workers = resolve_workers(num_workers)
        if not timeout or timeout <= 0:
            raise SmoosegError(f"crf_timeout must be a positive number of seconds, got {timeout!r}; "
                               "e.g. crf_timeout=120")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise SmoosegError(f"CRFPool max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.max_in_flight = max_in_flight
        self._closed_reason = None
        self._in_flight = collections.deque()
        self._live = set()
        self._executor = None
        if num_workers > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(os.getpid(),))

    def submit(self, images, log_probs, labels=False):
        """Start the CRF for a batch of images (uint8 H×W×3 or float 3×H×W) and K×h×w log-probs.

        ``labels=True`` returns each image's CRF argmax (H×W int16) instead of its marginals.
        """
        images, log_probs = list(images), list(log_probs)
        if len(images) != len(log_probs):
            raise SmoosegError(f"CRFPool.submit: {len(images)} images but {len(log_probs)} log-prob "
                               "maps; pass one log-prob map per image")
        jobs = [(_as_uint8_hwc(img), _as_float32_numpy(lp))
                for img, lp in zip(images, log_probs, strict=True)]
        return self._run(dense_crf_labels if labels else dense_crf, jobs)

    def busy_workers(self):
        """Workers running (or about to run) a CRF job now: 0 in-process, at most num_workers."""
        if self._executor is None:
            return 0
        self._live = {f for f in self._live if not f.done()}
        return min(self.num_workers, len(self._live))

    def _run(self, fn, args_list):
        """Run ``fn(*args)`` for each args tuple (a module-level, picklable fn); returns a handle."""
        self._check_open()
        if self._executor is None:
            return CRFHandle(self, results=[fn(*args) for args in args_list])
        self._throttle()
        try:
            futures = [self._executor.submit(fn, *args) for args in args_list]
        except BrokenProcessPool as exc:
            self._fail_died(exc)
        self._live.update(futures)
        handle = CRFHandle(self, futures=futures)
        self._in_flight.append(handle)
        return handle

    def _throttle(self):
        """Wait on the oldest outstanding batches until fewer than max_in_flight remain."""
        while True:
            while self._in_flight and self._in_flight[0].done():
                self._in_flight.popleft()
            busy = [h for h in self._in_flight if not h.done()]
            if len(busy) < self.max_in_flight:
                self._in_flight = collections.deque(busy)
                return
            self._wait(busy[0]._futures)

    def _wait(self, futures):
        """Block until ``futures`` are done; SmoosegError if no pool job finishes within timeout.
        An interrupt (Ctrl-C) while waiting kills the workers, closes the pool and propagates."""
        try:
            self._wait_done(futures)
        except KeyboardInterrupt:
            self._terminate()
            self._closed_reason = "interrupted"
            raise

    def _wait_done(self, futures):
        while not all(f.done() for f in futures):
            self._live = {f for f in self._live.union(futures) if not f.done()}
            if not self._live:
                continue
            finished, _ = wait(self._live, timeout=self.timeout, return_when=FIRST_COMPLETED)
            if not finished:
                self._fail(f"CRF worker timed out after {self.timeout:g} s (no CRF job finished); "
                           "set crf_timeout higher or crf_workers=0 to run the CRF in-process")
        broken = [f.exception() for f in futures
                  if not f.cancelled() and isinstance(f.exception(), BrokenProcessPool)]
        if broken:
            self._check_open()
            self._fail_died(broken[0])

    def _gather(self, futures):
        self._wait(futures)
        try:
            return [f.result() for f in futures]
        except CancelledError:
            raise SmoosegError("CRFPool was closed before this CRF batch finished; "
                               "call result() on every handle before closing the pool") from None

    def _check_open(self):
        if self._closed_reason is not None:
            raise SmoosegError(f"CRFPool is closed ({self._closed_reason}); create a new CRFPool")

    def _fail_died(self, exc):
        self._fail(f"CRF worker died (killed, crashed or out of memory: {exc}); "
                   "lower crf_workers or set crf_workers=0 to run the CRF in-process")

    def _fail(self, message):
        self._terminate()
        self._closed_reason = message.split(";")[0]
        raise SmoosegError(message)

    def _terminate(self):
        """Kill the workers at once (a hung, dead or interrupted worker cannot be shut down
        politely) and reap them; waits at most about JOIN_TIMEOUT_S, never on a CRF job."""
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        manager = getattr(executor, "_executor_manager_thread", None)  # shutdown() forgets it
        for process in processes:
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        if manager is not None and manager is not threading.current_thread():
            manager.join(max(0.0, deadline - time.monotonic()))
        self._live.clear()
        self._in_flight.clear()

    def _running(self):
        """Whether any submitted CRF job has not finished yet."""
        return any(not f.done() for f in self._live) or any(not h.done() for h in self._in_flight)

    def close(self, wait=True):
        """Stop the workers (queued batches are cancelled); the pool cannot be used afterwards.

        Idle workers are shut down politely; when jobs are still running (the caller stopped early:
        an error, Ctrl-C) the workers are killed at once, since nobody can collect their results.
        """
        if getattr(self, "_closed_reason", None) is None:
            self._closed_reason = "closed"
        executor = getattr(self, "_executor", None)
        if executor is None:
            return
        if self._running():
            self._terminate()
            return
        self._executor = None
        executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        try:
            self.close(wait=False)
        except Exception:
            pass
