"""Backbone benchmark: the frozen backbone's forward pass per image for each backbone family.

    python -m benchmarks.backbone_bench [--rows dino_vits8@224 dinov3_vits16@224 ...] [--depth N]

Each row builds a random-init backbone (the cost does not depend on the weights), runs
``frozen_features`` (inference mode, fp32 on CPU, autocast on a GPU) on ``--batch`` synthetic
images ``--warmup`` times, then ``--repeats`` times; reported: ms per image (the fastest pass),
the peak memory inside the row (process RSS sampled every 5 ms on CPU, also as growth over the
RSS before it; CUDA max allocated on a GPU), the patch grid and the feature width.  The rows
take turns in one process, so background load hits them alike.  ``--depth`` builds fewer
blocks (a smoke run), full depth by default.
"""

import argparse
import functools
import time

import timm
import torch

from benchmarks import PeakMemory, _rss_bytes, bench_main, describe_machine, format_table, machine, sync
from smooseg.errors import SmoosegError
from smooseg.model.backbone import Backbone, frozen_features

# row name -> (arch, model_type, patch_size); a row is NAME@SIZE
BACKBONES = {
    "dino_vits8": ("dino", "vit_small", 8),
    "dino_vits16": ("dino", "vit_small", 16),
    "dinov2_vits14": ("dinov2", "vit_small", 14),
    "dinov2_reg_vits14": ("dinov2_reg", "vit_small", 14),
    "dinov3_vits16": ("dinov3", "vit_small", 16),
    "dinov3_vitb16": ("dinov3", "vit_base", 16),
}
DEFAULT_ROWS = ("dino_vits8@224", "dinov3_vits16@224", "dinov3_vits16@448", "dinov2_reg_vits14@224")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.backbone_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                   help=f"NAME@SIZE rows; names: {', '.join(BACKBONES)}")
    p.add_argument("--batch", type=int, default=2, help="images per forward pass")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest counts")
    p.add_argument("--depth", type=int, default=0, help="blocks to build (0: the model's own depth)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def parse_row(row):
    """'dinov3_vits16@448' -> ('dinov3_vits16', 448); SmoosegError naming the choices otherwise."""
    name, _, size = row.partition("@")
    if name not in BACKBONES or not size.isdigit():
        raise SmoosegError(f"--rows {row}: use NAME@SIZE with NAME one of {', '.join(BACKBONES)}")
    return name, int(size)


def build(name, depth):
    create = timm.create_model
    if depth:
        timm.create_model = functools.partial(create, depth=depth)
    try:
        return Backbone(*BACKBONES[name], pretrained=False)
    finally:
        timm.create_model = create


def time_row(backbone, img, warmup, repeats):
    """Fastest wall-clock seconds of one ``frozen_features`` pass over ``img``; its grid."""
    for _ in range(warmup):
        feats = frozen_features(backbone, img)
    best = float("inf")
    for _ in range(repeats):
        sync(img.device)
        start = time.perf_counter()
        feats = frozen_features(backbone, img)
        sync(img.device)
        best = min(best, time.perf_counter() - start)
    return best, tuple(feats.shape[-2:])


def run(args):
    rows = [parse_row(r) for r in args.rows]
    device = torch.device(args.device)
    memory = PeakMemory(device)
    results = {"machine": machine(device), "memory": memory.kind(), "batch": args.batch,
               "depth": args.depth or "full", "rows": []}
    try:
        for name, size in rows:
            torch.manual_seed(0)
            backbone = build(name, args.depth).to(device)
            img = torch.randn(args.batch, 3, size, size, device=device)
            before = _rss_bytes() if device.type == "cpu" else 0
            with memory.track(f"{name}@{size}"):
                seconds, grid = time_row(backbone, img, args.warmup, args.repeats)
            peak = memory.peaks[f"{name}@{size}"]
            results["rows"].append({
                "row": f"{name}@{size}", "backbone": backbone.spec.key,
                "timm_model": backbone.spec.timm_model,
                "size": size, "grid": list(grid), "n_feats": backbone.n_feats,
                "ms_per_image": 1000 * seconds / args.batch, "peak_mem_mb": peak / 2**20,
                "mem_growth_mb": (peak - before) / 2**20 if device.type == "cpu" else None,
                "weights_mb": sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2**20})
            del backbone, img
    finally:
        memory.close()
    return results


def _memory(row):
    growth = row["mem_growth_mb"]
    return f"{row['peak_mem_mb']:.0f}" + ("" if growth is None else f" ({growth:+.0f})")


def report(results):
    headers = ["backbone", "size", "grid", "C", "ms / image", "peak mem MB (growth)", "weights MB"]
    rows = [[r["row"].split("@")[0], str(r["size"]), "x".join(map(str, r["grid"])), str(r["n_feats"]),
             f"{r['ms_per_image']:.1f}", _memory(r), f"{r['weights_mb']:.0f}"] for r in results["rows"]]
    return "\n".join([format_table(headers, rows),
                      f"batch {results['batch']}, depth {results['depth']}, peak mem: {results['memory']}",
                      describe_machine(results["machine"])])


def main(argv=None):
    return bench_main(parse_args, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
