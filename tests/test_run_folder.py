"""A run folder belongs to one run, and a preempted run can be continued, through the real
``train_segmentation.py``: a training started into the folder of a running one is refused (the
lock), SIGTERM saves ``last.ckpt`` at the step reached and exits 143, a new run into the dead
run's folder is refused, ``ckpt_path=last`` continues at the saved step. The output of a tiny
run holds the data sizes and none of the libraries' known noise."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout

pytestmark = pytest.mark.slow

# 8 training images, batch 2: 4 steps an epoch; no validation before max_steps.
TINY = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "num_workers=0", "logger=none", "seed=0", "+trainer.enable_model_summary=false",
        "final_eval.enabled=false"]
NOISE = ["LeafSpec", "litlogger", "Tip:", "module(s) in eval mode", "smaller than the logging interval",
         "exists and is not empty", "weights_only` was not set"]
STEP_IN_LOG = re.compile(r"^step (\d+)/\d+", re.MULTILINE)  # the plain progress lines (stdout is a file)


def errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def start_training(args, log_dir):
    """``python train_segmentation.py <args>`` in the background, its output in files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    out, err = open(log_dir / "stdout", "w"), open(log_dir / "stderr", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_segmentation.py"), *args], cwd=ROOT, env=env,
                            stdout=out, stderr=err)
    out.close(), err.close()
    return proc


def wait_until_training(proc, log_dir, timeout=240):
    """Until the progress lines show a few trained steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = (log_dir / "stderr").read_text()
            pytest.fail(f"training ended early ({proc.returncode}): {stderr[-3000:]}")
        text = (log_dir / "stdout").read_text(errors="replace")
        if any(int(n) >= 2 for n in STEP_IN_LOG.findall(text)):
            return
        time.sleep(0.5)
    proc.kill()
    pytest.fail("training did not start in time")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("data"), n_train=8, n_val=2, size=(32, 64), seed=0)


@pytest.fixture(scope="module")
def preempted(data, tmp_path_factory):
    """The whole story in one folder; returns what each step printed."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    args = TINY + [f"data_dir={data}", f"output_dir={out}", "val_check_interval=100000",
                   "trainer.log_every_n_steps=1"]
    logs = tmp / "logs"
    logs.mkdir()
    first = start_training(args + ["max_steps=100000"], logs)
    try:
        wait_until_training(first, logs)
        second = run_script("train_segmentation.py", *args, "max_steps=4", check=False)
        first.send_signal(signal.SIGTERM)
        status = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    stdout = (logs / "stdout").read_text()
    saved = re.search(r"stopped by SIGTERM at step (\d+): saved (\S+); continue with ckpt_path=last", stdout)
    assert saved, stdout[-3000:] + (logs / "stderr").read_text()[-3000:]
    step, path = int(saved.group(1)), saved.group(2)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh = run_script("train_segmentation.py", *args, "max_steps=4", check=False)
    resumed = run_script("train_segmentation.py", *args, f"max_steps={step + 2}", "ckpt_path=last")
    return {"out": out, "status": status, "stdout": stdout, "step": step, "path": path, "ckpt": ckpt,
            "second": second, "fresh": fresh, "resumed": resumed,
            "first_stderr": (logs / "stderr").read_text()}


def test_sigterm_saves_the_step_reached_and_exits_143(preempted):
    assert preempted["status"] == 143, preempted["first_stderr"][-3000:]
    assert preempted["path"] == str(preempted["out"] / "checkpoints" / "last.ckpt")
    assert preempted["step"] > 0 and preempted["ckpt"]["global_step"] == preempted["step"]
    assert "optimizer_states" in preempted["ckpt"] and preempted["ckpt"]["loops"]
    assert not [p for p in preempted["out"].rglob("*") if p.name.endswith(".tmp")]


def test_resume_continues_at_the_saved_step(preempted):
    resumed = preempted["resumed"]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    last = torch.load(preempted["out"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == preempted["step"] + 2


def test_a_training_into_a_running_trainings_folder_is_refused(preempted):
    proc = preempted["second"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"output_dir={preempted['out']}" in line and "is being written by a running training" in line
    assert "choose another output_dir" in line and "Traceback" not in proc.stderr
    assert "stopped by SIGTERM" in preempted["stdout"]  # the running one went on undisturbed


def test_a_new_run_into_a_finished_runs_folder_is_refused(preempted):
    proc = preempted["fresh"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"output_dir={preempted['out']}" in line and "already holds a run" in line
    assert "ckpt_path=last" in line and "another output_dir" in line


def test_output_is_quiet_and_names_the_data_sizes(preempted):
    for name in ("resumed",):
        text = preempted[name].stdout + preempted[name].stderr
        assert "data: 8 training images, 2 validation images" in text
        for noise in NOISE:
            assert noise not in text, (noise, text[-3000:])
    first = preempted["stdout"] + preempted["first_stderr"]
    assert "data: 8 training images, 2 validation images" in first
    assert not [noise for noise in NOISE if noise in first]


def test_unlabelled_validation_set_keeps_last_and_says_why_no_best(tmp_path):
    data = write_directory_layout(tmp_path / "data", name="mine", n_train=4, n_val=2, size=(32, 32),
                                  with_labels=False)
    out = tmp_path / "out"
    proc = run_script("train_segmentation.py", *TINY, f"data_dir={data}", f"output_dir={out}",
                      "dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine", "max_steps=2",
                      "val_check_interval=1", "trainer.enable_progress_bar=false")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt"], names
    assert proc.stdout.count("no best checkpoint: the validation images have no labels") == 1
    assert not [line for line in proc.stdout.splitlines() if line.startswith("best checkpoint:")]
    assert f"last checkpoint: {out / 'checkpoints' / 'last.ckpt'}" in proc.stdout


@pytest.mark.parametrize("kept,mark", [(("config.yaml",), "config.yaml"),
                                       (("checkpoints/best-step2-mIoU1.00.ckpt",), "checkpoints/best-step2"),
                                       (("final_eval/metrics.json",), "final_eval")])
def test_a_run_whose_last_checkpoint_is_gone_is_still_a_run(data, tmp_path, kept, mark, entry_point):
    out = tmp_path / "out"
    for name in kept:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("kept")
    proc = entry_point("train_segmentation.py", *TINY, f"data_dir={data}", f"output_dir={out}", "max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"output_dir={out} already holds a run ({mark}" in line and "another output_dir" in line
    assert "ckpt_path=last" not in line  # there is no last.ckpt to resume from
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == list(kept)
