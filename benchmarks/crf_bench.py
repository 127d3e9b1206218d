"""Dense CRF benchmark: pydensecrf2 (one core) against the torch CRF on CPU (and CUDA) — one process.

    python -m benchmarks.crf_bench --size 320 320 --classes 27 --kinds scene noise

Every row runs the same images (synthetic street scenes, ``scene``, and uniform colour noise,
``noise``: the worst case for the bilateral lattice, nearly one vertex per pixel and simplex
corner) with the same log-probs (noisy labels at 1/4 resolution), 10 mean-field iterations:

* ``pydensecrf``: :func:`smooseg.eval.crf.dense_crf`, one image per call on one core;
* ``torch cpu``: :func:`smooseg.eval.crf_torch.dense_crf_torch` with 1 torch thread, and with
  ``--threads`` (default: torch's default) when that is more than one;
* ``torch cuda``: the same on the GPU, one image per call and ``--batch`` images per call.

Reported per image: wall-clock ms (the fastest of ``--repeats`` passes over the images, after a
warm-up), peak memory (process RSS sampled every 5 ms on CPU, as an absolute peak and as the
growth over the RSS before the row; ``torch.cuda.max_memory_allocated`` on CUDA), the
per-image lattice construction (the bilateral lattice and its normalisation; the Gaussian one
depends on the image size alone and is built once, its cost shown separately) and its share of
the wall clock, and the parity with pydensecrf (max |Δ marginal|, argmax agreement).

``--no-pydensecrf`` leaves the reference row out (a machine without pydensecrf2: no speed-up and
no parity columns then), ``--no-torch-cpu`` the torch CPU rows (a GPU check that wants the CUDA
rows alone).
"""

import argparse
import functools
import os
import sys
import time

import numpy as np
import torch

from benchmarks import PeakMemory, bench_main, describe_machine, format_table, machine, sync
from smooseg.data.synthetic import street_scene
from smooseg.errors import SmoosegError
from smooseg.eval import crf_torch
from smooseg.eval.crf import dense_crf

KINDS = ("scene", "noise")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.crf_bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=2, default=(320, 320), metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=27)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="image kinds to run")
    p.add_argument("--images", type=int, default=2, help="images per kind")
    p.add_argument("--iters", type=int, default=10, help="mean-field iterations")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the images; the fastest counts")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of the multi-thread row (0: torch's default)")
    p.add_argument("--batch", type=int, default=4, help="images per call of the batched CUDA row")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda: cuda (auto: when available) adds the CUDA rows")
    p.add_argument("--no-pydensecrf", action="store_true",
                   help="leave out the pydensecrf row (and with it the speed-up and parity columns)")
    p.add_argument("--no-torch-cpu", action="store_true", help="leave out the torch CPU rows")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def make_case(kind, seed, size, n_classes):
    """(H×W×3 uint8 image, K×h×w log-probs) of one benchmark image."""
    rng = np.random.default_rng(seed)
    image, labels = street_scene(rng, size)
    if kind == "noise":
        image = rng.integers(0, 256, image.shape, dtype=np.uint8)
    small = (max(1, size[0] // 4), max(1, size[1] // 4))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64) % n_classes), n_classes)
    coarse = torch.nn.functional.interpolate(onehot.permute(2, 0, 1).float()[None], size=small,
                                             mode="area")[0]
    logits = 3.0 * coarse + torch.from_numpy(rng.normal(0, 1.5, (n_classes, *small))).float()
    return image, torch.log_softmax(logits, 0)


def _rss():
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def time_row(label, run_batch, cases, batch, device, repeats, memory):
    """Fastest pass of ``run_batch`` over ``cases`` in groups of ``batch``: ms per image, outputs."""
    groups = [cases[i:i + batch] for i in range(0, len(cases), batch)]
    run_batch(groups[0])  # warm-up (allocations, caches, the Gaussian lattice of this size)
    sync(device)
    rss_before = _rss()
    best, outputs = None, None
    with memory.track(label):
        for _ in range(repeats):
            start = time.perf_counter()
            outs = []
            for group in groups:
                outs.extend(run_batch(group))
            sync(device)
            seconds = time.perf_counter() - start
            if best is None or seconds < best:
                best, outputs = seconds, outs
    return 1e3 * best / len(cases), outputs, rss_before


def lattice_ms(cases, device, params, repeats):
    """Per-image bilateral lattice + normalisation, and the Gaussian one (per size), in ms."""
    images = [torch.from_numpy(image).to(device)[None] for image, _ in cases]
    per_image, grid = [], []
    height, width = cases[0][0].shape[:2]
    for _ in range(max(1, repeats)):
        for image in images:
            sync(device)
            start = time.perf_counter()
            crf_torch._NormalisedKernel(crf_torch._bilateral_lattice(image, params["bilateral_sxy"],
                                                                     params["bilateral_srgb"]))
            sync(device)
            per_image.append(time.perf_counter() - start)
        start = time.perf_counter()
        crf_torch._NormalisedKernel(crf_torch.PermutohedralLattice(
            crf_torch._grid_features(height, width, params["gaussian_sxy"], device)))
        sync(device)
        grid.append(time.perf_counter() - start)
    return 1e3 * min(per_image), 1e3 * min(grid)


def torch_row(kind, cases, reference, memory, params, repeats, device, label, n_threads, batch):
    """One row of ``dense_crf_torch`` on the ``kind`` images ``cases``: time, lattice share, peak memory and,
    given pydensecrf's ``reference`` outputs, the largest difference and the argmax agreement."""
    if device.type == "cpu":
        torch.set_num_threads(n_threads)

    def run_batch(group):
        images = torch.stack([torch.from_numpy(img) for img, _ in group]).to(device)
        log_probs = torch.stack([lp for _, lp in group]).to(device)
        return list(crf_torch.dense_crf_torch(images, log_probs, **params).cpu().numpy())

    mem = memory if device.type == "cpu" else PeakMemory(device)
    ms, outs, rss_before = time_row(label, run_batch, cases, batch, device, repeats, mem)
    lat, grid = lattice_ms(cases, device, params, repeats)
    row = {"kind": kind, "run": label, "device": device.type, "threads": n_threads, "batch": batch,
           "ms_per_image": ms, "lattice_ms": lat, "lattice_share": lat / ms,
           "grid_lattice_ms": grid, "peak_mem_mb": mem.peaks[label] / 2**20}
    if reference is not None:
        row["max_abs_diff"] = max(float(np.abs(o - r).max()) for o, r in zip(outs, reference, strict=True))
        row["argmax_agreement"] = float(np.mean([(o.argmax(0) == r.argmax(0)).mean()
                                                 for o, r in zip(outs, reference, strict=True)]))
    if device.type == "cpu":
        row["mem_growth_mb"] = (mem.peaks[label] - rss_before) / 2**20
    else:
        mem.close()
    return row


def run(args):
    if min(args.size) < 1 or args.classes < 1 or args.images < 1 or args.repeats < 1 or args.batch < 1 \
            or args.iters < 0:
        raise SmoosegError("--size, --classes, --images, --repeats and --batch must be >= 1, --iters >= 0")
    if args.device not in ("auto", "cpu", "cuda"):
        raise SmoosegError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SmoosegError("--device cuda: no CUDA GPU is available on this machine; use --device cpu")
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.no_pydensecrf and args.no_torch_cpu and not want_cuda:
        raise SmoosegError("--no-pydensecrf and --no-torch-cpu without CUDA leave no row to measure")
    size = tuple(args.size)
    params = {"iters": args.iters, "gaussian_sxy": 1, "gaussian_compat": 3, "bilateral_sxy": 67,
              "bilateral_srgb": 3, "bilateral_compat": 4}
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    cpu = torch.device("cpu")
    rows = []
    for kind in args.kinds:
        cases = [make_case(kind, 1000 * KINDS.index(kind) + i, size, args.classes)
                 for i in range(args.images)]
        memory = PeakMemory(cpu)
        try:
            reference = None
            if not args.no_pydensecrf:
                torch.set_num_threads(1)
                ms, reference, rss_before = time_row(
                    "pydensecrf", lambda group: [dense_crf(img, lp, **params) for img, lp in group],
                    cases, 1, cpu, args.repeats, memory)
                rows.append({"kind": kind, "run": "pydensecrf", "device": "cpu", "threads": 1, "batch": 1,
                             "ms_per_image": ms, "peak_mem_mb": memory.peaks["pydensecrf"] / 2**20,
                             "mem_growth_mb": (memory.peaks["pydensecrf"] - rss_before) / 2**20})

            measure = functools.partial(torch_row, kind, cases, reference, memory, params, args.repeats)
            if not args.no_torch_cpu:
                rows.append(measure(cpu, "torch cpu", 1, 1))
                if threads > 1:
                    rows.append(measure(cpu, f"torch cpu {threads} threads", threads, 1))
            torch.set_num_threads(default_threads)
            if want_cuda:
                cuda = torch.device("cuda")
                rows.append(measure(cuda, "torch cuda", threads, 1))
                if args.batch > 1:
                    rows.append(measure(cuda, f"torch cuda batch {args.batch}", threads, args.batch))
        finally:
            memory.close()
            torch.set_num_threads(default_threads)
    base = {r["kind"]: r["ms_per_image"] for r in rows if r["run"] == "pydensecrf"}
    for r in rows:
        if r["kind"] in base:
            r["speedup_vs_pydensecrf"] = base[r["kind"]] / r["ms_per_image"]
        for key, value in list(r.items()):
            if isinstance(value, float):
                r[key] = round(value, 7 if key == "max_abs_diff" else 4)
    return {"benchmark": "crf", "machine": machine(torch.device("cuda") if want_cuda else cpu),
            "settings": {"size": list(size), "classes": args.classes, "kinds": list(args.kinds),
                         "images_per_kind": args.images, "iters": args.iters, "repeats": args.repeats,
                         "threads": threads, "batch": args.batch, "cuda": want_cuda,
                         "pydensecrf": not args.no_pydensecrf, "torch_cpu": not args.no_torch_cpu},
            "rows": rows}


def report(results):
    s = results["settings"]
    headers = ["image", "run", "ms/image", "vs pydensecrf", "lattice ms (share)", "grid lattice ms",
               "peak mem MB", "max |Δ|", "argmax agree"]
    table = []
    for r in results["rows"]:
        mem = f"{r['peak_mem_mb']:.0f}"
        if "mem_growth_mb" in r:
            mem += f" (+{r['mem_growth_mb']:.0f})"
        table.append([r["kind"], r["run"], f"{r['ms_per_image']:.1f}",
                      f"{r['speedup_vs_pydensecrf']:.2f}x" if "speedup_vs_pydensecrf" in r else "-",
                      f"{r['lattice_ms']:.1f} ({r['lattice_share']:.0%})" if "lattice_ms" in r else "-",
                      f"{r['grid_lattice_ms']:.1f}" if "grid_lattice_ms" in r else "-", mem,
                      f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-",
                      f"{r['argmax_agreement']:.5f}" if "argmax_agreement" in r else "-"])
    return "\n".join([
        f"CRF benchmark: {s['size'][0]}x{s['size'][1]} px, {s['classes']} classes, {s['iters']} iterations, "
        f"{s['images_per_kind']} images per kind, fastest of {s['repeats']} pass(es)",
        describe_machine(results["machine"]),
        format_table(headers, table),
        "peak mem: process RSS on CPU (growth over the RSS before the row in brackets), "
        "torch.cuda.max_memory_allocated on CUDA; lattice: the per-image bilateral lattice and its "
        "normalisation; grid lattice: the Gaussian term's, built once per image size and cached",
    ])


def main(argv=None):
    return bench_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
