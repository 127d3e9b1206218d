"""Signals through the real entry points: each ends with one line and its status, keeps what the
README says it keeps and leaves no worker behind. SIGTERM to crop_datasets.py (its parent alone,
as ``kill <pid>`` does, and its whole process group, as a scheduler does) -> 143, finished crops
kept, no temporary file, no BrokenPipeError, the same command finishes the set; SIGTERM during
training's final evaluation -> 143 and a line naming the checkpoint to evaluate; Ctrl-C delivered
to the whole process group during training -> ``error: interrupted`` and 130."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script
from smooseg.data.synthetic import write_cityscapes_layout

pytestmark = pytest.mark.slow

TINY = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "logger=none", "seed=0", "+trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1"]


def start(script, args, log_dir):
    """``python <script> <args>`` in its own process group (as a shell job), output in files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=err, start_new_session=True)


def wait_for(proc, condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"ended ({proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(proc, send):
    """Send with ``send(proc)``, wait; returns (status, stdout, stderr) and asserts no child lives on."""
    kids = children(proc.pid)
    send(proc)
    status = proc.wait(timeout=120)
    time.sleep(0.5)
    assert not [pid for pid in kids if alive(pid)], "a worker outlived its parent"
    return status


def read(log_dir):
    return (log_dir / "stdout").read_text(errors="replace"), (log_dir / "stderr").read_text(errors="replace")


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("crops"), n_train=48, n_val=1, size=(256, 512))


@pytest.mark.parametrize("whom", ["parent", "group"])
def test_sigterm_during_cropping(many_images, tmp_path, whom):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cityscapes").symlink_to(many_images / "cityscapes")
    folder = data / "cropped" / "cityscapes_five_crop_0.5" / "img" / "train"
    args = [f"data_dir={data}", "datasets=[cityscapes]", "num_workers=2", "progress=false"]
    proc = start("crop_datasets.py", args, tmp_path)
    wait_for(proc, lambda: folder.is_dir() and len(list(folder.glob("*.jpg"))) >= 10, "ten crops")
    send = (lambda p: p.send_signal(signal.SIGTERM)) if whom == "parent" else (
        lambda p: os.killpg(p.pid, signal.SIGTERM))
    status = stop(proc, send)
    out, err = read(tmp_path)
    assert status == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), err[-3000:]
    assert "run the same command again" in lines[0]
    assert not [p for p in (data / "cropped").rglob("*") if p.name.endswith(".tmp")]
    assert len(list(folder.glob("*.jpg"))) < 5 * 48  # stopped part-way
    again = run_script("crop_datasets.py", *args)
    assert "240 files written" not in again.stdout and len(list(folder.glob("*.jpg"))) == 5 * 48


def test_sigterm_during_the_final_evaluation(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=4, n_val=60, size=(64, 128))
    out = tmp_path / "out"
    args = TINY + [f"data_dir={data}", f"output_dir={out}", "num_workers=0", "max_steps=2",
                   "val_check_interval=2", "final_eval.crf=true", "final_eval.crf_workers=2",
                   "final_eval.batch_size=1", "eval_res=64"]
    proc = start("train_segmentation.py", args, tmp_path)
    wait_for(proc, lambda: "final evaluation:" in read(tmp_path)[0], "final evaluation")
    status = stop(proc, lambda p: p.send_signal(signal.SIGTERM))
    stdout, stderr = read(tmp_path)
    assert status == 143, stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM during the final evaluation: training is complete"), \
        stdout[-2000:]
    assert "eval_segmentation.py model_paths=" in last and "Traceback" not in stderr, stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "final_eval" / "metrics.json").exists()


def test_ctrl_c_to_the_process_group_during_training(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=8, n_val=1, size=(32, 64))
    out = tmp_path / "out"
    args = TINY + [f"data_dir={data}", f"output_dir={out}", "num_workers=1", "max_steps=100000",
                   "val_check_interval=100000", "final_eval.enabled=false"]
    proc = start("train_segmentation.py", args, tmp_path)
    steps = re.compile(r"^step (\d+)/", re.MULTILINE)
    wait_for(proc, lambda: any(int(n) >= 3 for n in steps.findall(read(tmp_path)[0])), "three steps")
    status = stop(proc, lambda p: os.killpg(p.pid, signal.SIGINT))
    stdout, stderr = read(tmp_path)
    assert status == 130, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == ["error: interrupted"], stderr[-3000:]
    assert "Detected KeyboardInterrupt" not in stdout + stderr


@pytest.fixture(scope="module")
def cityscapes_checkpoint(tmp_path_factory):
    """A random-init ViT-S/16 checkpoint for Cityscapes-27 (what eval and segment load)."""
    import torch

    from conftest import make_module

    torch.manual_seed(0)
    module = make_module(n_classes=27, dataset_name="cityscapes", patch_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "city.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize("script, whom", [("eval_segmentation.py", "group"), ("segment_images.py", "parent")])
def test_sigterm_during_evaluation_and_segmentation(cityscapes_checkpoint, tmp_path, script, whom):
    """``kill <pid>`` (the parent alone) and a scheduler's SIGTERM to the whole group, one program each."""
    data = write_cityscapes_layout(tmp_path / "data", n_train=1, n_val=40, size=(64, 128))
    out = tmp_path / "out"
    common = ["crf=true", "crf_workers=2", f"output_dir={out}"]
    if script == "eval_segmentation.py":
        args = [f"model_paths=[{cityscapes_checkpoint}]", f"data_dir={data}", "batch_size=1", "eval_res=64",
                "num_workers=0", *common]
    else:
        args = [f"model_path={cityscapes_checkpoint}", f"input_dir={data / 'cityscapes' / 'leftImg8bit'}",
                "recursive=true", "size=64", "progress=false", *common]
    proc = start(script, args, tmp_path)
    wait_for(proc, lambda: len(children(proc.pid)) >= 2, "CRF workers")
    time.sleep(1.0)  # the pool at work
    send = (lambda p: p.send_signal(signal.SIGTERM)) if whom == "parent" else (
        lambda p: os.killpg(p.pid, signal.SIGTERM))
    status = stop(proc, send)
    stdout, stderr = read(tmp_path)
    assert status == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("eval: ")]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert "run the same command again" in lines[0] and str(out) in lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    assert not list(out.rglob("metrics.json")) and not (out / "summary.json").exists()
