"""Training-step benchmark: unoptimised vs optimised vs feature-cached, in one process.

    python -m benchmarks.train_bench --arch vit_small --patch 8 --res 112 --batch 8 --steps 10

Four configurations of the same SmooSeg module (random-init backbone, synthetic Cityscapes-
layout images) take turns, one step each, so background load hits them alike:

* ``unoptimised``: float32, timm's fused attention off, backbone on every image, eager;
* ``optimised``: fused attention, backbone under inference mode with ``--precision`` autocast
  (``auto``: bf16 on a GPU, float32 on CPU), eager (``perf.compile=false``, the default);
* ``compiled``: as ``optimised`` with the backbone and heads + loss through ``torch.compile``
  (``perf.compile=true``; compiled during the warm-up steps; ``--no-compile`` skips this row);
* ``cached``: the best uncached path (``compiled``, or ``optimised`` with ``--no-compile``)
  reading the backbone features from the feature cache.

Each step is split into data, backbone, heads + loss (forward and backward) and optimiser
(Adam step + teacher EMA) time; rates and times are medians over the timed steps.  Peak
memory is CUDA max allocated or the sampled process RSS.
"""

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks import PeakMemory, Stopwatch, bench_main, describe_machine, format_table, machine
from smooseg.data.datasets import DatasetInfo, build_dataset
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.model.net import NetConfig, SmooSegNet
from smooseg.runtime import autocast_dtype, resolve_device
from smooseg.train.feature_cache import open_or_build
from smooseg.train.module import SmooSegModule

CONFIGS = ("unoptimised", "optimised", "compiled", "cached")
PHASES = ("data", "backbone", "heads_loss", "optimiser")
TARGET_SETTINGS = {"arch": "vit_small", "patch": 8, "res": 112, "batch": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_bench", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="dino", help="backbone family: dino | dinov2")
    p.add_argument("--arch", default="vit_small", help="backbone model type: vit_small | vit_base | ...")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--res", type=int, default=112, help="training crop size (pixels)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--precision", default="auto", choices=("auto", "32", "bf16", "16"),
                   help="optimised path: backbone and heads autocast (auto: bf16 on GPU, 32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--images", type=int, default=0, help="training images (0: 2 x batch)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile row (compiling takes ~30 s on a 2-core CPU)")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def make_module(args, device):
    torch.manual_seed(0)
    net = SmooSegNet(NetConfig(27, arch=args.family, model_type=args.arch, patch_size=args.patch),
                     pretrained=False)
    return SmooSegModule(net, DatasetInfo(27, name="cityscapes")).to(device).train()


def endless(loader):
    """Batches of ``loader`` forever (a fresh shuffle each pass)."""
    while True:
        yield from loader


def configs(args):
    """The configurations this run measures, in the order they take turns."""
    return tuple(c for c in CONFIGS if not (c == "compiled" and args.no_compile))


def configure(module, config, args):
    """Switch the module to one configuration's settings; returns its heads autocast dtype.

    The optimised paths autocast the heads like Lightning's ``*-mixed`` precision would (the
    cosine-correlation and loss math stays float32 inside).
    """
    optimised = config != "unoptimised"
    module.net.backbone.set_fused_attn(optimised)
    module.net.backbone_precision = args.precision if optimised else "32"
    module.compile = config == "compiled" or (config == "cached" and best_uncached(args) == "compiled")
    module.net.compile_backbone = module.compile
    return autocast_dtype(args.precision, module.device) if optimised else None


def best_uncached(args):
    """The fastest uncached configuration measured: what the cache is compared with."""
    return "optimised" if args.no_compile else "compiled"


def train_step(module, optimizer, batches, dtype, watch):
    """One training step, timed per phase by ``watch``."""
    device = module.device
    with watch.phase("data"):
        batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    with watch.phase("backbone"):
        feats = module.features(batch)
    with watch.phase("heads_loss"):
        autocast = nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
        with autocast:
            loss = module.training_losses(feats)["terms"]["total"]
        loss.backward()
    with watch.phase("optimiser"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.net.predictor.ema_update(module.loss_config.ema_alpha)
    return float(loss.detach())


def build_data(args, root, module, device):
    """(image loader, cached-feature loader, cache info) over a synthetic training set."""
    n_images = args.images or 2 * args.batch
    write_cityscapes_layout(root, n_train=n_images, n_val=1, size=(args.res, 2 * args.res), seed=0)
    images = build_dataset("cityscapes", root, "train", args.res, crop="center")
    start = time.perf_counter()
    cached = open_or_build(images, module.net.backbone, Path(root) / "feature_cache", "cityscapes", "train",
                           args.res, "center", "nearest", dtype=args.cache_dtype, batch_size=args.batch,
                           device=device, precision=args.precision, progress=True)
    build_s = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in cached.path.iterdir())
    info = {"images": n_images, "build_s": round(build_s, 3), "disk_mb": round(disk / 2**20, 3),
            "dtype": args.cache_dtype, "build_images_per_s": round(n_images / build_s, 2)}
    return loader(images, args, device), loader(cached, args, device), info


def loader(dataset, args, device):
    """The shuffled training loader of one stream."""
    return DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                      persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")


def stream(config, image_loader, cache_loader, args, device):
    """Endless batches for one configuration.  With worker processes each uncached configuration
    gets a loader of its own: a loader's persistent workers serve one iterator, so streams sharing
    it would reset each other's prefetching at every epoch end."""
    if config == "cached":
        return endless(cache_loader)
    if args.workers == 0 or config == "unoptimised":
        return endless(image_loader)
    return endless(loader(image_loader.dataset, args, device))


def summarise(steps, batch, peak):
    """Medians over the timed steps (robust to bursts of background load) of one configuration."""
    walls = [wall for wall, _ in steps]
    median = float(np.median(walls))
    phases = {f"{k}_ms": round(1e3 * float(np.median([t.get(k, 0.0) for _, t in steps])), 2) for k in PHASES}
    return {"steps_per_s": round(1 / median, 4), "images_per_s": round(batch / median, 3),
            "step_ms": round(1e3 * median, 2), "mean_step_ms": round(1e3 * float(np.mean(walls)), 2),
            "peak_mem_mb": round(peak / 2**20, 1), **phases}


def run(args):
    """Run the three configurations; returns the results dict (also what --json writes)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch < 2:
        raise SmoosegError("--steps must be >= 1 and --batch >= 2 (the inter-image loss pairs images)")
    device = resolve_device(args.device)
    module = make_module(args, device)
    optimizer = module.configure_optimizers()
    memory = PeakMemory(device)
    with tempfile.TemporaryDirectory(prefix="smooseg_train_bench_") as root:
        image_loader, cache_loader, cache_info = build_data(args, root, module, device)
        names = configs(args)
        streams = {c: stream(c, image_loader, cache_loader, args, device) for c in names}
        timed = {c: [] for c in names}
        for step in range(args.warmup + args.steps):
            for config in names:
                dtype = configure(module, config, args)
                watch = Stopwatch(device)
                with memory.track(config):
                    start = time.perf_counter()
                    train_step(module, optimizer, streams[config], dtype, watch)
                    wall = time.perf_counter() - start
                if step >= args.warmup:
                    timed[config].append((wall, watch.totals))
    memory.close()
    table = {c: summarise(timed[c], args.batch, memory.peaks.get(c, 0)) for c in names}
    rate = {c: table[c]["steps_per_s"] for c in names}
    uncached = best_uncached(args)
    ratios = {f"{c}_vs_unoptimised": round(rate[c] / rate["unoptimised"], 3) for c in names[1:]}
    ratios["cached_vs_uncached"] = round(rate["cached"] / rate[uncached], 3)
    return {
        "benchmark": "train", "machine": machine(device), "memory": memory.kind(),
        "settings": {"family": args.family, "arch": args.arch, "patch": args.patch, "res": args.res,
                     "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                     "precision": args.precision, "device": str(device), "compile": not args.no_compile,
                     "workers": args.workers},
        "cache": cache_info, "configs": table, "best_uncached": uncached, "ratios": ratios,
    }


def targets(results):
    """The CPU performance targets, checked when the run used their settings."""
    s, r = results["settings"], results["ratios"]
    if results["machine"]["gpu"] is not None or any(s[k] != v for k, v in TARGET_SETTINGS.items()):
        return ["targets: not checked (they are stated for CPU, ViT-S/8, 112 px, batch 8)"]
    best = results["best_uncached"]
    checks = [(f"cached >= 5x uncached ({best})", r["cached_vs_uncached"], 5.0),
              (f"optimised uncached ({best}) >= 1.2x unoptimised", r[f"{best}_vs_unoptimised"], 1.2)]
    return [f"target {name}: {value:.2f}x {'met' if value >= goal else 'MISSED'}"
            for name, value, goal in checks]


def report(results):
    """The printed report: settings, machine, the table, ratios and targets."""
    s = results["settings"]
    headers = ["config", "steps/s", "images/s", f"peak mem MB ({results['memory']})", "step ms", "data ms",
               "backbone ms", "heads+loss ms", "optimiser ms"]
    rows = [[name, f"{c['steps_per_s']:.3f}", f"{c['images_per_s']:.2f}", f"{c['peak_mem_mb']:.0f}",
             f"{c['step_ms']:.1f}", f"{c['data_ms']:.1f}", f"{c['backbone_ms']:.1f}",
             f"{c['heads_loss_ms']:.1f}", f"{c['optimiser_ms']:.1f}"]
            for name, c in results["configs"].items()]
    r, cache = results["ratios"], results["cache"]
    lines = [
        f"train benchmark: {s['family']} {s['arch']}/{s['patch']}, {s['res']} px, batch {s['batch']}, "
        f"{s['steps']} timed steps (+{s['warmup']} warm-up) per config, precision {s['precision']}, "
        f"device {s['device']}",
        describe_machine(results["machine"]),
        f"feature cache: {cache['images']} images, {cache['disk_mb']:.2f} MB {cache['dtype']}, "
        f"built in {cache['build_s']:.2f} s",
        format_table(headers, rows),
        "ratios (steps/s): " + ", ".join(
            [f"{name.replace('_vs_', ' / ')} = {value:.2f}x" for name, value in r.items()
             if name != "cached_vs_uncached"]
            + [f"cached / {results['best_uncached']} = {r['cached_vs_uncached']:.2f}x"]),
    ]
    return "\n".join(lines + targets(results))


def main(argv=None):
    return bench_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
