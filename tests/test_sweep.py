"""Sweeps (-m) through the real train_segmentation.py: every job's settings are checked before
the first job starts, and a sweep stopped part-way (SIGTERM during job 1) is finished by the same
command with ckpt_path=auto: job 0 is kept as it is, job 1 resumes at its saved step, job 2
starts, and summary.json covers all three."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from smooseg.data.synthetic import write_cityscapes_layout

TINY = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "num_workers=0", "logger=none", "+trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1"]


def test_a_bad_value_in_the_middle_of_a_sweep_stops_it_before_job_0(tmp_path, entry_point):
    out = tmp_path / "sweep"
    proc = entry_point("train_segmentation.py", "-m", *TINY, f"output_dir={out}", "max_steps=2",
                       "optim.lr1=0.001,-1,0.01")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: job 1 of the sweep ("), proc.stderr[-3000:]
    assert "optim.lr1=-1" in lines[0] and "nothing was run" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_stopped_sweep_is_finished_by_the_same_command_with_ckpt_path_auto(tmp_path, entry_point):
    data = write_cityscapes_layout(tmp_path / "data", n_train=6, n_val=2, size=(32, 64))
    out = tmp_path / "sweep"
    command = ["-m", *TINY, f"data_dir={data}", f"output_dir={out}", "max_steps=6", "val_check_interval=2",
               "seed=0,1,2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, str(ROOT / "train_segmentation.py"), *command], cwd=ROOT,
                                 env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while log.read_text().count("step 3/6") < 2:  # job 1 has trained three steps
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, log.read_text()[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", log.read_text()).group(1))
    assert 3 <= stopped < 6 and not (out / "2").exists() and not (out / "summary.json").exists()
    kept = (out / "0" / "final_eval" / "metrics.json").stat().st_mtime_ns

    refused = entry_point("train_segmentation.py", *command)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr

    again = run_script("train_segmentation.py", *command, "ckpt_path=auto")
    assert f"{out / '0'}: finished (step 6 of 6, final evaluation written); kept" in again.stdout
    resumed_from = out / "1" / "checkpoints" / "last.ckpt"
    assert f"{out / '1'}: resuming from {resumed_from} (step {stopped} of 6)" in again.stdout
    assert (out / "0" / "final_eval" / "metrics.json").stat().st_mtime_ns == kept
    for job in ("0", "1", "2"):
        last = torch.load(out / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert [(run["job"], run["seed"]) for run in summary["runs"]] == [("0", 0), ("1", 1), ("2", 2)]
    assert summary["n"] == 3 and "summary over 3 jobs" in again.stdout
