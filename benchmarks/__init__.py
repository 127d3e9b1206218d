"""Benchmarks (``python -m benchmarks.train_bench``, ``python -m benchmarks.eval_bench``).

Each script measures the optimised code path against the same code with the optimisations
switched off, in one process, prints a table with the ratios and the machine, and writes the
numbers as JSON with ``--json PATH``.  This module holds what both scripts share.
"""

import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from smooseg.errors import SmoosegError
from smooseg.io import write_json


def cpu_name():
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """What the numbers were measured on: CPU, cores, torch threads, GPU, versions, load."""
    info = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "cuda_available": torch.cuda.is_available(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def describe_machine(info):
    """One line naming the machine, saying so when no GPU is used."""
    gpu = info["gpu"] or ("none (CPU run)" if info["cuda_available"] else "none available")
    load = f", load average {info['load_average_1min']}" if "load_average_1min" in info else ""
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
            f"GPU: {gpu}; torch {info['torch']}{load}")


def sync(device):
    """Wait for queued GPU work so wall-clock timings are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory per label: CUDA max allocated, or the process RSS sampled every 5 ms on CPU."""

    def __init__(self, device, interval=0.005):
        self.device = device
        self.interval = interval
        self.peaks = {}
        self._label = None
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda" and Path("/proc/self/statm").exists():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _note(self, label, value):
        self.peaks[label] = max(self.peaks.get(label, 0), value)

    def _sample(self):
        while not self._stop.wait(self.interval):
            label = self._label
            if label is not None:
                self._note(label, _rss_bytes())

    @contextmanager
    def track(self, label):
        """Attribute the memory used inside the block to ``label``."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._label = label
        try:
            yield
        finally:
            self._label = None
            if self.device.type == "cuda":
                self._note(label, torch.cuda.max_memory_allocated(self.device))
            elif self._thread is not None:
                self._note(label, _rss_bytes())
            else:
                import resource

                self._note(label, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def kind(self):
        return "CUDA max allocated" if self.device.type == "cuda" else "process RSS"

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Stopwatch:
    """Accumulates wall-clock seconds per phase; syncs the GPU at each phase boundary."""

    def __init__(self, device):
        self.device = device
        self.totals = {}

    @contextmanager
    def phase(self, name):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


def format_table(headers, rows):
    """A plain-text table: headers, a rule, then one line per row (cells already strings)."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), "-" * len(line(headers))] + [line(r) for r in rows])


def bench_main(parse_args, run, report, argv=None):
    """Shared command line: parse, run, print the table, write JSON with ``--json``; 2 on a user error."""
    args = parse_args(argv)
    try:
        results = run(args)
    except SmoosegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(results))
    if args.json:
        print(f"results: {write_json(results, args.json)}")
    return 0
