"""GPU check: the CUDA correctness tests and the GPU performance table in one run, one report.

    python -m benchmarks.gpu_check OUTPUT_DIR [--dry-run] [--budget-s 450]
    bash benchmarks/gpu_check.sh OUTPUT_DIR      # on a bare GPU machine: installs carried wheels first
    make gpu-check                               # the dry run on a CPU machine, into gpu_check_output/

The parts run in the order of their value, each under a time limit, and a failing part (an
exception, a crash, a timeout) is recorded with the tail of its traceback while the next one
starts, so one run always yields a full report:

1. ``environment``: torch, CUDA, the GPU, the packages the check needs, a bf16 matmul smoke test;
2. ``tests``: ``python -m pytest -m gpu tests/test_gpu.py`` (training in 32-true / 16-mixed /
   bf16-mixed, eager vs compiled, cached vs uncached, GPU vs CPU evaluation, the CUDA CRF vs
   pydensecrf, resume on the GPU);
3. ``train_vits8_bf16``: :mod:`benchmarks.train_bench`, ViT-S/8 at 224 px, batch 32: unoptimised,
   optimised (eager), compiled and cached steps/s, images/s, peak memory, the cache build rate;
4. ``eval_vits8``: :mod:`benchmarks.eval_bench`, 500 synthetic 320 px images with flip: no CRF,
   pydensecrf on every core (pipelined), the torch CRF on the GPU;
5. ``crf_320``: :mod:`benchmarks.crf_bench`, 320x320, 27 classes: torch CRF on CUDA (one image and
   batches of 4 per call) against pydensecrf on one core;
6. ``train_vitb8_bf16``, 7. ``train_vits8_fp16``, 8. ``train_vits8_fp32``: as 3.

Every configuration is measured against the unoptimised one in the same process, as the
benchmark scripts do.  The budget (``--budget-s``, 7.5 minutes) covers the whole run: a part
that no longer fits falls back to its cheaper variant (training without the compiled row,
evaluation on fewer images) or is skipped ("skipped: budget"); the estimates below are guesses
until a GPU run has replaced them with the seconds it recorded.  Without pydensecrf the
pydensecrf rows are skipped and the rest still runs.

``--dry-run`` runs the same parts on the CPU at tiny sizes (ViT-S/16, 32 px, batch 2, 2 steps,
4 evaluation images), hides any GPU from every child process and writes no GPU number: it shows
the script works and which parts a GPU run adds ("skipped: no CUDA").

Written into OUTPUT_DIR (at most 8 files, no sub-folders): ``gpu_check.json`` (everything),
``gpu_check.md`` (the tables), ``gpu_check.log`` (what this script printed), ``parts.log`` (the
benchmarks' own output), ``pytest.log`` and ``pytest.xml`` (the tests), and ``setup.log`` when
``gpu_check.sh`` installed the packages.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "skipped: no CUDA", "skipped: no pydensecrf", "skipped: budget", "skipped: not selected",
            "failed")
REPORT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log", "parts.log", "pytest.log", "pytest.xml",
                "setup.log")  # setup.log: written by gpu_check.sh
MARGIN_S = 10.0  # kept back from the budget for writing the report
PACKAGES = ("torch", "triton", "timm", "pytorch-lightning", "torchmetrics", "numpy", "scipy", "pillow",
            "hydra-core", "omegaconf", "antlr4-python3-runtime", "pydensecrf2", "pytest", "tensorboard",
            "matplotlib")
NO_PYDENSECRF_ENV = "SMOOSEG_GPU_CHECK_NO_PYDENSECRF"


# ---- the parts ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """How one part runs this time: the arguments, the time limit and what it leaves out."""

    argv: list
    timeout_s: float
    variant: str = "full"
    notes: list = field(default_factory=list)
    skipped_rows: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    name: str
    kind: str            # environment | tests | train | eval | crf
    title: str           # what it measures on the GPU
    estimate_s: float    # GPU seconds of the full variant (a guess until measured)
    cap_s: float         # GPU time limit of the full variant
    reduced_estimate_s: float = 0.0  # the cheaper variant's (0: none)
    reduced_cap_s: float = 0.0
    needs_cuda: bool = True
    options: tuple = ()  # kind-specific settings (model, precision)

    def opt(self, key):
        return dict(self.options)[key]


PARTS = (
    Part("environment", "environment", "torch, CUDA, GPU, packages; bf16 matmul and SDPA smoke test",
         20, 60, needs_cuda=False),
    Part("tests", "tests", "pytest -m gpu tests/test_gpu.py: CUDA correctness", 150, 240, needs_cuda=False),
    Part("train_vits8_bf16", "train", "training steps, ViT-S/8, 224 px, batch 32, bf16", 100, 180, 35, 90,
         options=(("arch", "vit_small"), ("precision", "bf16"), ("images", 256))),
    Part("eval_vits8", "eval", "evaluation, ViT-S/8, 500 synthetic 320 px images, flip: no CRF / "
         "pydensecrf on every core / torch CRF on the GPU", 70, 150, 35, 90),
    Part("crf_320", "crf", "dense CRF per image, 320x320, 27 classes: torch on CUDA vs pydensecrf (1 core)",
         30, 90),
    Part("train_vitb8_bf16", "train", "training steps, ViT-B/8, 224 px, batch 32, bf16", 120, 180, 45, 100,
         options=(("arch", "vit_base"), ("precision", "bf16"), ("images", 128))),
    Part("train_vits8_fp16", "train", "training steps, ViT-S/8, 224 px, batch 32, fp16", 90, 150, 35, 90,
         options=(("arch", "vit_small"), ("precision", "16"), ("images", 128))),
    Part("train_vits8_fp32", "train", "training steps, ViT-S/8, 224 px, batch 32, fp32", 90, 150, 35, 90,
         options=(("arch", "vit_small"), ("precision", "32"), ("images", 128))),
)
PART_NAMES = tuple(p.name for p in PARTS)
DRY_CAP_S = {"environment": 60, "tests": 150}  # others: 90
DRY_NOTE = "CPU dry run"
PRECISION_NAMES = {"bf16": "bf16", "16": "fp16", "32": "fp32"}


def train_plan(part, dry, facts, timeout, reduced):
    precision = part.opt("precision")
    if dry:
        argv = ["--arch", part.opt("arch"), "--patch", "16", "--res", "32", "--batch", "2", "--steps", "2",
                "--warmup", "1", "--precision", precision, "--device", "cpu", "--images", "4", "--no-compile"]
        model = "ViT-B" if part.opt("arch") == "vit_base" else "ViT-S"
        plan = Plan(argv, timeout, notes=[f"{DRY_NOTE}: {model}/16, 32 px, batch 2, 2 steps, eager only "
                                          f"(GPU: {model}/8, 224 px, batch 32, 20 steps)"])
        plan.skipped_rows["compiled"] = "skipped: dry run (compiling takes ~30 s on a 2-core CPU)"
        return plan
    workers = max(1, min(8, (facts.get("cores") or 2) // 2))
    argv = ["--arch", part.opt("arch"), "--patch", "8", "--res", "224", "--batch", "32", "--steps", "20",
            "--warmup", "3", "--precision", precision, "--device", "cuda", "--workers", str(workers),
            "--images", str(part.opt("images"))]
    plan = Plan(argv, timeout)
    if reduced:
        argv.append("--no-compile")
        plan.variant = "reduced"
        plan.skipped_rows["compiled"] = "skipped: budget (torch.compile dropped to fit the time left)"
    return plan


def eval_plan(part, dry, facts, timeout, reduced):
    runs = ["no_crf", "crf_pipelined", "crf_torch"]
    skipped = {}
    if facts.get("pydensecrf") is False:
        runs.remove("crf_pipelined")
        skipped["crf_pipelined"] = "skipped: no pydensecrf"
    if dry:
        argv = ["--patch", "16", "--images", "4", "--size", "32", "64", "--res", "32", "--batch", "2",
                "--crf-workers", "1", "--repeats", "1", "--device", "cpu", "--runs", *runs]
        plan = Plan(argv, timeout, notes=[f"{DRY_NOTE}: ViT-S/16, 4 images at 32 px, torch CRF on the CPU "
                                          "(GPU: ViT-S/8, 500 images at 320 px, torch CRF on CUDA)"],
                    skipped_rows=skipped)
        return plan
    images = "200" if reduced else "500"
    cores = facts.get("cores") or 2
    argv = ["--patch", "8", "--images", images, "--size", "320", "640", "--res", "320", "--batch", "8",
            "--crf-workers", str(cores), "--repeats", "1", "--device", "cuda", "--workers", "4",
            "--runs", *runs]
    skipped["crf_serial"] = "not run: the pipelined pool on every core is the pydensecrf number that counts"
    plan = Plan(argv, timeout, variant="reduced" if reduced else "full", skipped_rows=skipped)
    if reduced:
        plan.notes.append("200 images instead of 500 to fit the time left")
    return plan


def crf_plan(part, dry, facts, timeout, reduced):
    skipped = {}
    if dry:
        argv = ["--size", "32", "32", "--classes", "5", "--kinds", "scene", "--images", "1", "--repeats", "1",
                "--iters", "5", "--device", "cpu"]
        skipped["torch cuda"] = "skipped: no CUDA"
        notes = [f"{DRY_NOTE}: 32x32, 5 classes, 5 iterations, torch CRF on the CPU "
                 "(GPU: 320x320, 27 classes, 10 iterations, torch CRF on CUDA)"]
    else:
        argv = ["--size", "320", "320", "--classes", "27", "--kinds", "scene", "noise", "--images", "2",
                "--repeats", "3", "--batch", "4", "--device", "cuda", "--no-torch-cpu"]
        notes = []
        skipped["torch cpu"] = "not run: the CUDA rows are what this check is for"
    if facts.get("pydensecrf") is False:
        argv.append("--no-pydensecrf")
        skipped["pydensecrf"] = "skipped: no pydensecrf (no speed-up or parity columns)"
    return Plan(argv, timeout, notes=notes, skipped_rows=skipped)


def simple_plan(part, dry, facts, timeout, reduced):
    return Plan([], timeout, notes=[DRY_NOTE] if dry and part.kind == "environment" else [])


PLANNERS = {"environment": simple_plan, "tests": simple_plan, "train": train_plan, "eval": eval_plan,
            "crf": crf_plan}


def plan_part(part, dry, facts, remaining_s):
    """(Plan, None) for a part that runs now, or (None, status) for one that is skipped."""
    if part.needs_cuda and not dry and facts.get("cuda") is False:
        return None, "skipped: no CUDA"
    if dry:
        timeout = min(DRY_CAP_S.get(part.name, 90), remaining_s)
        reduced = False
    elif remaining_s >= part.estimate_s:
        timeout, reduced = min(part.cap_s, remaining_s), False
    elif part.reduced_estimate_s and remaining_s >= part.reduced_estimate_s:
        timeout, reduced = min(part.reduced_cap_s, remaining_s), True
    else:
        return None, "skipped: budget"
    if timeout < 5:
        return None, "skipped: budget"
    return PLANNERS[part.kind](part, dry, facts, timeout, reduced), None


# ---- what the worker process runs ---------------------------------------------------------------

def block_pydensecrf():
    """Make ``import pydensecrf`` fail in this process (rehearses a machine without it)."""
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils", "pydensecrf.eigen"):
        sys.modules[name] = None


def package_versions():
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def importable(module):
    try:
        __import__(module)
        return True, None
    except Exception as err:  # ImportError, or a broken build raising something else
        return False, f"{type(err).__name__}: {err}"


def run_environment(argv):
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "packages": package_versions(), "pythonpath": os.environ.get("PYTHONPATH", "")}
    if hasattr(os, "sched_getaffinity"):
        info["cores_available"] = len(os.sched_getaffinity(0))
    for module, key in (("pydensecrf.densecrf", "pydensecrf"), ("hydra", "hydra"),
                        ("omegaconf", "omegaconf")):
        ok, err = importable(module)
        info[key] = {"importable": ok, "error": err}
    info["device"] = "cpu"
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version(), multiprocessors=props.multi_processor_count)
        smoke = {}
        start = time.perf_counter()
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        smoke["bf16_matmul_finite"] = bool(torch.isfinite(a @ a).all())
        q = torch.randn(2, 6, 784, 64, device="cuda", dtype=torch.float16)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        smoke["fp16_sdpa_finite"] = bool(torch.isfinite(out).all())
        torch.cuda.synchronize()
        smoke["seconds"] = round(time.perf_counter() - start, 3)
        info["smoke"] = smoke
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                     "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"not available ({err})"
    else:
        info["gpu"] = None
    return info


def run_bench(module_name):
    def runner(argv):
        import importlib

        module = importlib.import_module(f"benchmarks.{module_name}")
        results = module.run(module.parse_args(argv))
        print(module.report(results), flush=True)
        return results
    return runner


RUNNERS = {"environment": run_environment, "train": run_bench("train_bench"), "eval": run_bench("eval_bench"),
           "crf": run_bench("crf_bench")}


def worker_main():
    """Run the jobs the parent sends on stdin (one JSON line each) and write each result file."""
    if os.environ.get(NO_PYDENSECRF_ENV):
        block_pydensecrf()
    for line in sys.stdin:
        job = json.loads(line)
        print(f"\n===== part {job['name']}: {job['kind']} {' '.join(job['argv'])}", flush=True)
        start = time.perf_counter()
        try:
            out = {"ok": True, "results": RUNNERS[job["kind"]](job["argv"])}
        except BaseException as err:  # noqa: BLE001 - everything is reported, the parent decides
            out = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
            traceback.print_exc()
        out["seconds"] = round(time.perf_counter() - start, 2)
        print(f"===== part {job['name']}: {'ok' if out['ok'] else 'failed'} in {out['seconds']} s",
              flush=True)
        tmp = job["result"] + ".tmp"
        Path(tmp).write_text(json.dumps(out, default=str))
        os.replace(tmp, job["result"])
        if not out["ok"]:
            return 1  # a failed part may leave the CUDA context broken: the parent starts a fresh worker
    return 0


# ---- the parent: children, time limits, the report ----------------------------------------------

def child_env(dry, no_pydensecrf=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run never touches a GPU, even where there is one
    if no_pydensecrf:
        env[NO_PYDENSECRF_ENV] = "1"
    return env


def kill_group(proc):
    """Kill a child we started and everything it started (it leads its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def tail(path, chars=3000):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


class Worker:
    """One long-lived child process that runs the benchmark parts (torch imported once)."""

    def __init__(self, log_path, env):
        self.log_path, self.env, self.proc, self.log = log_path, env, None, None

    def start(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--worker"], cwd=ROOT,
                                     env=self.env, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run(self, name, kind, argv, timeout_s, scratch):
        """(outcome dict, None) or (None, error message) for one job."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        result = Path(scratch) / f"{name}.json"
        request = {"name": name, "kind": kind, "argv": argv, "result": str(result)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result.exists():
                out = json.loads(result.read_text())
                if not out["ok"]:
                    self.stop()
                return out, None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                return None, f"the worker process died (exit code {code})"
            time.sleep(0.2)
        self.stop()
        return None, f"timed out after {timeout_s:.0f} s (killed)"

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            kill_group(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


def parse_junit(path):
    """[{test, outcome, seconds, message}] from pytest's JUnit XML (empty when it is missing)."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return []
    tests = []
    for case in tree.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip()
                break
        tests.append({"test": case.get("name"), "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), "message": message[:600]})
    return tests


def parse_verbose_log(text):
    """Per-test outcomes from ``pytest -v`` lines (when the XML never got written: a timeout)."""
    tests = []
    for line in text.splitlines():
        if "::" in line and line.startswith("tests/"):
            for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
                if f" {word}" in line:
                    tests.append({"test": line.split("::", 1)[1].split(" ", 1)[0], "outcome": word.lower(),
                                  "seconds": None, "message": ""})
                    break
    return tests


def run_tests(out_dir, env, timeout_s):
    """The pytest part: ``pytest -m gpu tests/test_gpu.py`` in its own process group."""
    log_path, xml_path = out_dir / "pytest.log", out_dir / "pytest.xml"
    for path in (log_path, xml_path):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-rA",
           "-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            error = None
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code, error = None, f"timed out after {timeout_s:.0f} s (killed)"
    seconds = round(time.perf_counter() - start, 2)
    tests = parse_junit(xml_path) or parse_verbose_log(tail(log_path, 200000))
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    results = {"exit_code": code, "tests": tests, "counts": counts, "command": " ".join(cmd[1:])}
    if error is None and code not in (0, 1, 5):
        error = f"pytest exited {code} (collection or usage error)"
    if error is None and not tests:
        error = f"pytest ran no test (exit code {code})"
    if error is None and (counts.get("failed") or counts.get("error")):
        error = f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} errors"
    if error is not None:
        return "failed", results, seconds, error, tail(log_path)
    if counts.get("passed", 0) == 0 and all("CUDA" in t["message"] for t in tests):
        return "skipped: no CUDA", results, seconds, None, None
    return "ok", results, seconds, None, None


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.facts = {"pydensecrf": None, "cuda": None, "cores": os.cpu_count()}
        if args.no_pydensecrf:
            self.facts["pydensecrf"] = False
        self.env = child_env(args.dry_run, args.no_pydensecrf)
        self.worker = Worker(self.out / "parts.log", self.env)
        self.parts = [{"name": p.name, "title": p.title, "status": "pending"} for p in PARTS]
        self.report = {
            "check": "gpu_check", "dry_run": bool(args.dry_run), "budget_s": args.budget_s,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_check", *sys.argv[1:]]),
            "host": platform.node(), "facts": self.facts, "parts": self.parts,
        }
        if (self.out / "setup.log").exists():
            self.report["setup_log_tail"] = tail(self.out / "setup.log", 3000)
        self.log = open(self.out / "gpu_check.log", "w")
        (self.out / "parts.log").write_text("")

    def say(self, text):
        print(text, flush=True)
        if not self.log.closed:
            self.log.write(text + "\n")
            self.log.flush()

    def remaining(self):
        return self.deadline - time.monotonic() - MARGIN_S

    def learn(self, env_results):
        """What the environment part found decides which parts can run."""
        self.facts["cuda"] = bool(env_results.get("cuda_available"))
        self.facts["gpu"] = env_results.get("gpu")
        self.facts["cores"] = (env_results.get("cores_available") or env_results.get("cores")
                               or self.facts["cores"])
        self.facts["hydra"] = env_results.get("hydra", {}).get("importable")
        if not self.args.no_pydensecrf:
            self.facts["pydensecrf"] = env_results.get("pydensecrf", {}).get("importable")

    def run_part(self, index, part, scratch):
        entry = self.parts[index]
        if self.args.parts and part.name not in self.args.parts:
            entry.update(status="skipped: not selected")
            return
        plan, skip = plan_part(part, self.args.dry_run, self.facts, self.remaining())
        if plan is None:
            entry.update(status=skip)
            if skip == "skipped: budget":
                entry["notes"] = [f"needed ~{part.reduced_estimate_s or part.estimate_s:.0f} s, "
                                  f"{max(0.0, self.remaining()):.0f} s left"]
            self.say(f"[{index + 1}/{len(PARTS)}] {part.name}: {skip}")
            return
        self.say(f"[{index + 1}/{len(PARTS)}] {part.name}: {part.title} (limit {plan.timeout_s:.0f} s"
                 + (", reduced" if plan.variant == "reduced" else "") + ")")
        entry.update(status="running", variant=plan.variant, argv=plan.argv, timeout_s=round(plan.timeout_s),
                     notes=plan.notes, skipped_rows=plan.skipped_rows)
        self.write_reports()
        start = time.perf_counter()
        if part.kind == "tests":
            status, results, seconds, error, log_tail = run_tests(self.out, self.env, plan.timeout_s)
            entry.update(status=status, results=results, seconds=seconds,
                         device="cuda" if self.facts.get("cuda") and not self.args.dry_run else "cpu")
            if error:
                entry.update(error=error, traceback=log_tail)
        else:
            outcome, error = self.worker.run(part.name, part.kind, plan.argv, plan.timeout_s, scratch)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            if outcome is not None and outcome["ok"]:
                entry.update(status="ok", results=outcome["results"],
                             device=device_of(part, outcome["results"]))
                if part.kind == "environment":
                    self.learn(outcome["results"])
            else:
                entry.update(status="failed", error=error or outcome["error"],
                             traceback=(outcome or {}).get("traceback") or tail(self.out / "parts.log"))
        self.say(f"      -> {entry['status']} in {entry.get('seconds', 0):.1f} s"
                 + (f": {entry['error']}" if entry.get("error") else ""))

    def run(self):
        scratch = tempfile.mkdtemp(prefix="smooseg_gpu_check_")
        dry = " (DRY RUN on the CPU: tiny sizes, no GPU number)" if self.args.dry_run else ""
        self.say(f"GPU check{dry}: budget {self.args.budget_s:.0f} s, output {self.out}")
        try:
            for index, part in enumerate(PARTS):
                try:
                    self.run_part(index, part, scratch)
                except Exception as err:  # a bug of this script: record it and go on
                    self.parts[index].update(status="failed", error=f"gpu_check: {type(err).__name__}: {err}",
                                             traceback=traceback.format_exc()[-4000:])
                self.write_reports()
        finally:
            self.worker.stop()
            for f in Path(scratch).glob("*"):
                f.unlink()
            os.rmdir(scratch)
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.write_reports(final=True)
        self.say(summary_text(self.report))
        self.say(f"report: {self.out / 'gpu_check.md'} and {self.out / 'gpu_check.json'}")
        self.log.close()
        return 0

    def write_reports(self, final=False):
        self.report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds") \
            if final else None
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.report["notice"] = notice(self.report)
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str) + "\n"),
                           ("gpu_check.md", markdown(self.report))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def device_of(part, results):
    if part.kind == "environment":
        return results.get("device")
    settings = results.get("settings", {})
    if "device" in settings:
        return str(settings["device"])
    return "cuda" if settings.get("cuda") else "cpu"


def notice(report):
    if report["dry_run"]:
        return ("DRY RUN on the CPU at tiny sizes: it shows the script works; no number in it is a GPU "
                "number, and none may be quoted as one")
    gpu = report["facts"].get("gpu")
    if gpu:
        return f"measured on {gpu} by this run"
    return "no CUDA GPU was found: the GPU parts were skipped and no GPU number was measured"


# ---- the report: tables --------------------------------------------------------------------------

def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(entry):
    """One short line of the part's main numbers (or why it has none)."""
    results = entry.get("results")
    if entry["status"] != "ok" or not results:
        if entry.get("error"):
            return entry["error"][:160]
        if entry["status"] == "skipped: no CUDA" and results:
            return ", ".join(f"{v} {k}" for k, v in results.get("counts", {}).items()) + " (no CUDA)"
        return "; ".join(entry.get("notes", []))[:160]
    name = entry["name"]
    if name == "environment":
        pkgs = results.get("packages", {})
        return (f"{results.get('gpu') or 'no GPU'}; torch {results.get('torch')} "
                f"(CUDA {results.get('cuda_build')}); "
                f"pydensecrf {'yes' if results.get('pydensecrf', {}).get('importable') else 'NO'}; "
                f"hydra {pkgs.get('hydra-core') or 'NO'}")
    if name == "tests":
        return ", ".join(f"{v} {k}" for k, v in results.get("counts", {}).items())
    bench = results.get("benchmark")
    if bench == "train":
        configs = results["configs"]
        base = configs["unoptimised"]["steps_per_s"]
        best = results.get("best_uncached", "optimised")
        parts = [f"{c} {configs[c]['steps_per_s']:.2f} steps/s ({configs[c]['steps_per_s'] / base:.2f}x)"
                 for c in (best, "cached") if c in configs]
        return ", ".join(parts) + f"; unoptimised {base:.2f} steps/s"
    if bench == "eval":
        return ", ".join(f"{n} {r['images_per_s']:.1f} img/s" for n, r in results["runs"].items())
    if bench == "crf":
        rows = [r for r in results["rows"] if r["kind"] == "scene"] or results["rows"]
        return ", ".join(f"{r['run']} {r['ms_per_image']:.1f} ms" for r in rows)
    return ""


def finished(report, benchmark):
    """``(part, results)`` of each part that ran the ``benchmark`` (train / eval / crf) to the end."""
    return [(e, e["results"]) for e in report["parts"]
            if e["status"] == "ok" and e.get("results") and e["results"].get("benchmark") == benchmark]


def parts_rows(report):
    rows = []
    for i, e in enumerate(report["parts"], 1):
        skipped = "; ".join(f"{k}: {v}" for k, v in (e.get("skipped_rows") or {}).items())
        rows.append([str(i), e["name"], e["status"], e.get("device") or "-",
                     fmt(e.get("seconds"), 1), headline(e), skipped or "-"])
    return rows


PART_HEADERS = ["#", "part", "status", "device", "seconds", "result", "left out"]


def train_rows(report):
    rows = []
    for _, r in finished(report, "train"):
        s = r["settings"]
        model = f"{s['arch'].replace('vit_', 'ViT-').replace('small', 'S').replace('base', 'B')}/{s['patch']}"
        base = r["configs"]["unoptimised"]["steps_per_s"]
        for config, c in r["configs"].items():
            precision = ("fp32" if config == "unoptimised"
                         else PRECISION_NAMES.get(s["precision"], s["precision"]))
            rows.append([model, f"{s['res']}", str(s["batch"]), precision, config, s["device"],
                         fmt(c["steps_per_s"], 3), fmt(c["images_per_s"], 1),
                         f"{c['steps_per_s'] / base:.2f}x", fmt(c["peak_mem_mb"], 0), fmt(c["step_ms"], 1),
                         fmt(c["data_ms"], 1), fmt(c["backbone_ms"], 1), fmt(c["heads_loss_ms"], 1),
                         fmt(c["optimiser_ms"], 1)])
    return rows


TRAIN_HEADERS = ["model", "px", "batch", "precision", "config", "device", "steps/s", "images/s",
                 "vs unoptimised", "peak MB", "step ms", "data ms", "backbone ms", "heads+loss ms",
                 "optimiser ms"]


def cache_rows(report):
    rows = []
    for e, r in finished(report, "train"):
        c = r["cache"]
        rate = c.get("build_images_per_s") or (c["images"] / c["build_s"] if c["build_s"] else None)
        rows.append([e["name"], r["settings"]["device"], str(c["images"]), fmt(c["build_s"], 2), fmt(rate, 1),
                     fmt(c["disk_mb"], 1), c["dtype"]])
    return rows


CACHE_HEADERS = ["part", "device", "images", "build s", "images/s", "disk MB", "dtype"]


def eval_rows(report):
    rows = []
    for _, r in finished(report, "eval"):
        s, metrics = r["settings"], r.get("metrics", {})
        for name, run in r["runs"].items():
            m = metrics.get(name, {})
            rows.append([name, s["device"], str(s["images"]), f"{s['res']}", str(run["workers"]),
                         fmt(run["wall_s"], 2), fmt(run["images_per_s"], 1),
                         fmt(run.get("crf_ms_per_image"), 1), fmt(run["peak_mem_mb"], 0),
                         fmt(m.get("mIoU"), 2), fmt(m.get("Accuracy"), 2)])
    return rows


EVAL_HEADERS = ["run", "device", "images", "px", "CRF workers", "wall s", "images/s", "CRF ms/image",
                "peak MB", "mIoU", "Accuracy"]


def crf_rows(report):
    rows = []
    for _, r in finished(report, "crf"):
        s = r["settings"]
        for row in r["rows"]:
            rows.append([f"{s['size'][0]}x{s['size'][1]}x{s['classes']}", row["kind"], row["run"],
                         row["device"], str(row["batch"]), fmt(row["ms_per_image"], 2),
                         f"{row['speedup_vs_pydensecrf']:.1f}x" if "speedup_vs_pydensecrf" in row else "-",
                         f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-",
                         f"{row['argmax_agreement']:.5f}" if "argmax_agreement" in row else "-",
                         fmt(row.get("lattice_ms"), 2), fmt(row["peak_mem_mb"], 0)])
    return rows


CRF_HEADERS = ["size", "image", "run", "device", "batch", "ms/image", "vs pydensecrf", "max abs diff",
               "argmax agree", "lattice ms", "peak MB"]


def test_rows(report):
    entry = next((e for e in report["parts"] if e["name"] == "tests"), None)
    tests = (entry or {}).get("results", {}) or {}
    return [[t["test"], t["outcome"], fmt(t["seconds"], 1), (t["message"] or "").splitlines()[0][:140]
             if t["message"] else ""] for t in tests.get("tests", [])]


def markdown(report):
    env = next((e.get("results") for e in report["parts"] if e["name"] == "environment"), None) or {}
    title = ("GPU check: DRY RUN on the CPU" if report["dry_run"]
             else f"GPU check: {report['facts'].get('gpu') or 'no GPU'}")
    cores = env.get("cores_available", env.get("cores", "?"))
    out = [f"# {title}", "", f"**{report['notice']}.**", "",
           f"- command: `{report['command']}`",
           f"- started {report['started']}, wall {report.get('wall_s')} s "
           f"of a {report['budget_s']:.0f} s budget"
           + ("" if report.get("finished") else " (still running or killed)"),
           f"- machine: {env.get('gpu') or 'no GPU'}, {cores} cores, "
           f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}", "",
           "## Parts", "", md_table(PART_HEADERS, parts_rows(report)), ""]
    sections = (("Correctness tests (pytest -m gpu)", ["test", "outcome", "seconds", "message"],
                 test_rows(report)),
                ("Training steps (benchmarks/train_bench.py)", TRAIN_HEADERS, train_rows(report)),
                ("Feature-cache build", CACHE_HEADERS, cache_rows(report)),
                ("Evaluation (benchmarks/eval_bench.py)", EVAL_HEADERS, eval_rows(report)),
                ("Dense CRF (benchmarks/crf_bench.py)", CRF_HEADERS, crf_rows(report)))
    for heading, headers, rows in sections:
        out += [f"## {heading}", "", md_table(headers, rows) if rows else "(no result)", ""]
    out += ["Training: `unoptimised` is float32 with timm's fused attention off and the backbone on "
            "every image; `optimised` fused attention + autocast at the part's precision, eager; "
            "`compiled` the same through torch.compile; `cached` the best uncached path reading the "
            "feature cache. Peak memory is CUDA max allocated on a GPU, process RSS on a CPU.", ""]
    failures = [e for e in report["parts"] if e.get("traceback")]
    if failures:
        out += ["## Failures", ""]
        for e in failures:
            out += [f"### {e['name']}: {e.get('error', '')}", "", "```", e["traceback"][-2500:], "```", ""]
    return "\n".join(out)


def text_table(headers, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), "-" * len(line(headers))] + [line(r) for r in rows])


def summary_text(report):
    lines = ["", f"== GPU check summary: {report['notice']}", text_table(PART_HEADERS, parts_rows(report))]
    for heading, headers, rows in (("training", TRAIN_HEADERS[:9], [r[:9] for r in train_rows(report)]),
                                   ("evaluation", EVAL_HEADERS, eval_rows(report)),
                                   ("dense CRF", CRF_HEADERS, crf_rows(report))):
        if rows:
            lines += ["", f"-- {heading}", text_table(headers, rows)]
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("output_dir", nargs="?", help="folder for gpu_check.json / .md and the logs")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (GPUs hidden): no GPU number")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--parts", nargs="+", choices=PART_NAMES, default=None, help="run only these parts")
    p.add_argument("--no-pydensecrf", action="store_true",
                   help="behave as if pydensecrf2 were not installed (rehearses a bare machine)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not args.output_dir:
        p.error("OUTPUT_DIR is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main()
    check = Check(args)

    def stop(signum, frame):  # the machine's own limit: leave a report of what finished
        check.worker.stop()
        check.say(f"interrupted by signal {signum}")
        check.write_reports(final=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
