"""``python -m benchmarks.gpu_check OUT --dry-run`` (what ``make gpu-check`` runs) on this CPU: the
report lists every part with a status and holds no GPU number; the GPU plans parse and shrink
with the budget.  No timing is asserted."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import crf_bench, eval_bench, gpu_check, train_bench
from conftest import ROOT

BENCHES = {"train": train_bench, "eval": eval_bench, "crf": crf_bench}
GPU_FACTS = {"cuda": True, "pydensecrf": True, "cores": 16, "gpu": "NVIDIA H200"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(out), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "gpu_check.json").read_text())


def walk(node):
    """Every dict inside a JSON value."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_dry_run_reports_every_part(dry_run):
    out, stdout, report = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8  # what comes back from a GPU machine
    assert set(files) <= set(gpu_check.REPORT_FILES)
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "parts.log", "pytest.log"} <= set(files)
    assert report["dry_run"] is True and report["finished"]
    assert [p["name"] for p in report["parts"]] == list(gpu_check.PART_NAMES)
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert set(status.values()) <= {"ok", "skipped: no CUDA", "failed"}, status
    assert status["tests"] == "skipped: no CUDA"  # every CUDA test collected and skipped
    assert all(v == "ok" for k, v in status.items() if k != "tests"), status  # the CPU stand-ins ran
    tests = report["parts"][1]["results"]["tests"]
    assert len(tests) >= 8 and {t["outcome"] for t in tests} == {"skipped"}
    assert {"test_resume_on_cuda", "test_evaluation_on_cuda_equals_cpu"} <= {t["test"] for t in tests}
    crf = next(p for p in report["parts"] if p["name"] == "crf_320")
    assert crf["skipped_rows"]["torch cuda"] == "skipped: no CUDA"
    train = next(p for p in report["parts"] if p["name"] == "train_vits8_bf16")
    assert set(train["results"]["configs"]) == {"unoptimised", "optimised", "cached"}
    assert "compiled" in train["skipped_rows"] and train["results"]["cache"]["build_images_per_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: DRY RUN") and "no number in it is a GPU number" in md
    for name in gpu_check.PART_NAMES:
        assert f"| {name} |" in md and name in stdout
    assert "GPU check summary" in stdout and "skipped: no CUDA" in stdout


def test_dry_run_writes_no_cuda_number(dry_run):
    _, _, report = dry_run
    assert report["facts"]["cuda"] is False and report["facts"]["gpu"] is None
    for node in walk(report):
        for key in ("device", "gpu"):
            value = node.get(key)
            assert value is None or not str(value).startswith("cuda") and "H200" not in str(value), node
        assert node.get("cuda_available") in (None, False)
        assert node.get("cuda") in (None, False)
    for part in report["parts"]:
        assert part.get("device") in (None, "cpu"), part["name"]
        for row in (part.get("results") or {}).get("rows", []):
            assert row["device"] == "cpu" and "cuda" not in row["run"]
        memory = (part.get("results") or {}).get("memory")
        assert memory in (None, "process RSS")


def test_gpu_plans_parse_and_shrink_with_the_budget():
    parts = {p.name: p for p in gpu_check.PARTS}
    for part in gpu_check.PARTS:
        plan, skip = gpu_check.plan_part(part, False, GPU_FACTS, 1000)
        assert skip is None and plan.variant == "full" and plan.timeout_s == part.cap_s
        if part.kind in BENCHES:
            args = BENCHES[part.kind].parse_args(plan.argv)
            assert args.device == "cuda"
    train = gpu_check.plan_part(parts["train_vits8_bf16"], False, GPU_FACTS, 1000)[0]
    args = train_bench.parse_args(train.argv)
    assert (args.arch, args.patch, args.res, args.batch, args.precision, args.no_compile) == (
        "vit_small", 8, 224, 32, "bf16", False)
    assert train_bench.parse_args(gpu_check.plan_part(parts["train_vitb8_bf16"], False, GPU_FACTS, 1000)[0]
                                  .argv).arch == "vit_base"
    ev = eval_bench.parse_args(gpu_check.plan_part(parts["eval_vits8"], False, GPU_FACTS, 1000)[0].argv)
    assert (ev.patch, ev.images, tuple(ev.size), ev.res, ev.no_flip, ev.crf_workers) == (
        8, 500, (320, 640), 320, False, 16)
    assert ev.runs == ["no_crf", "crf_pipelined", "crf_torch"]
    crf = crf_bench.parse_args(gpu_check.plan_part(parts["crf_320"], False, GPU_FACTS, 1000)[0].argv)
    assert (tuple(crf.size), crf.classes, crf.no_pydensecrf) == ((320, 320), 27, False)
    # a short budget: the cheaper variant, then nothing
    reduced, _ = gpu_check.plan_part(parts["train_vits8_fp16"], False, GPU_FACTS, 40)
    assert reduced.variant == "reduced" and "--no-compile" in reduced.argv
    assert "compiled" in reduced.skipped_rows
    assert reduced.timeout_s == 40
    assert gpu_check.plan_part(parts["train_vits8_fp16"], False, GPU_FACTS, 20) == (None, "skipped: budget")
    assert "200" in gpu_check.plan_part(parts["eval_vits8"], False, GPU_FACTS, 50)[0].argv
    # no CUDA outside a dry run: nothing is measured
    for name in ("train_vits8_bf16", "eval_vits8", "crf_320"):
        planned = gpu_check.plan_part(parts[name], False, dict(GPU_FACTS, cuda=False), 1000)
        assert planned == (None, "skipped: no CUDA")
    # no pydensecrf: its rows are left out, the rest still runs
    bare = dict(GPU_FACTS, pydensecrf=False)
    ev = gpu_check.plan_part(parts["eval_vits8"], False, bare, 1000)[0]
    assert eval_bench.parse_args(ev.argv).runs == ["no_crf", "crf_torch"]
    assert ev.skipped_rows["crf_pipelined"] == "skipped: no pydensecrf"
    crf = gpu_check.plan_part(parts["crf_320"], False, bare, 1000)[0]
    assert crf_bench.parse_args(crf.argv).no_pydensecrf and "pydensecrf" in crf.skipped_rows


def test_report_tables_take_gpu_results(dry_run):
    """The tables of a GPU run (compiled rows, CUDA CRF rows, a failure) render: shaped from the dry run."""
    _, _, report = copy.deepcopy(dry_run)
    report["dry_run"], report["facts"] = False, dict(GPU_FACTS)
    train = next(p for p in report["parts"] if p["name"] == "train_vits8_bf16")
    configs = train["results"]["configs"]
    configs["compiled"] = dict(configs["optimised"])
    train["results"]["best_uncached"] = "compiled"
    crf = next(p for p in report["parts"] if p["name"] == "crf_320")
    crf["results"]["rows"].append(dict(crf["results"]["rows"][-1], run="torch cuda batch 4", device="cuda",
                                       batch=4))
    report["parts"][-1].update(status="failed", error="timed out after 90 s (killed)",
                               traceback="Traceback ...")
    report["notice"] = gpu_check.notice(report)
    md = gpu_check.markdown(report)
    assert "# GPU check: NVIDIA H200" in md and "measured on NVIDIA H200" in md
    assert "| compiled |" in md and "torch cuda batch 4" in md and "## Failures" in md
    text = gpu_check.summary_text(report)
    assert "compiled" in text and "timed out" in text


def test_without_pydensecrf_the_torch_paths_still_run(monkeypatch):
    """A machine without pydensecrf2 (a bare GPU machine whose build failed): evaluation without CRF
    and with the torch CRF, and the torch CRF benchmark, run; pydensecrf itself fails in one line."""
    from smooseg.errors import SmoosegError
    from smooseg.eval.crf import dense_crf

    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils", "pydensecrf.eigen"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SmoosegError, match="pydensecrf2.*crf_backend=torch"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.float32))
    results = eval_bench.run(eval_bench.parse_args(
        ["--patch", "16", "--images", "2", "--size", "32", "64", "--res", "32", "--batch", "2",
         "--repeats", "1", "--device", "cpu", "--runs", "no_crf", "crf_torch"]))
    assert set(results["runs"]) == {"no_crf", "crf_torch"} and results["nocrf_agrees"] is True
    assert "torch_vs_no_crf_wall" in results["ratios"] and "crf_torch" in eval_bench.report(results)
    rows = crf_bench.run(crf_bench.parse_args(["--size", "16", "16", "--classes", "3", "--kinds", "scene",
                                               "--images", "1", "--iters", "2", "--device", "cpu",
                                               "--no-pydensecrf"]))["rows"]
    assert rows and all("speedup_vs_pydensecrf" not in r and "max_abs_diff" not in r for r in rows)
