"""Every file the package writes is written whole or not at all, in its own folder: a full disk
(a small tmpfs, mounted where the machine lets this user mount; skipped otherwise, with the
reason) leaves the previous checkpoint or JSON intact and no partial file, with one line naming
the folder; checkpoints never pass through ``$TMPDIR`` (here on another file system)."""

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import run_script, train_settings
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.io import write_json

TINY = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "num_workers=0", "logger=none", "seed=0", "+trainer.enable_model_summary=false",
        "final_eval.enabled=false", "val_check_interval=2", "max_steps=4"]
CHECKPOINT_MB = 89  # a ViT-S/16 run's checkpoint (the frozen backbone is saved with it)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size (``tmpfs("200m")``) under tmp_path; skipped when this user
    cannot mount (CI runs as root in its container; elsewhere it needs privileges)."""
    mounted = []

    def mount(size, name="disk"):
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("data"), n_train=6, n_val=2, size=(32, 64), seed=0)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_full_disk_in_training_keeps_the_previous_checkpoints(data, tmpfs):
    # room for config.yaml and the two checkpoints of step 2, not for a third file of that size:
    # step 4's checkpoint write runs out of space however the mIoU went
    disk = tmpfs(f"{2 * CHECKPOINT_MB + 30}m")
    out = disk / "run"
    proc = run_script("train_segmentation.py", *TINY, f"data_dir={data}", f"output_dir={out}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left in {out / 'checkpoints'}") and "free space" in lines[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("best-step2-"), names
    for name in names:  # whole files of step 2, loadable
        saved = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert saved["global_step"] == 2


def test_full_disk_keeps_the_previous_json(tmpfs):
    disk = tmpfs("64k")
    target = disk / "metrics.json"
    write_json({"mIoU": 1.0}, target)
    before = digest(target)
    with pytest.raises(SmoosegError) as err:
        write_json({"big": "x" * 200_000}, target)
    assert str(err.value).startswith(f"no space left in {disk}")
    assert digest(target) == before and os.listdir(disk) == ["metrics.json"]


def test_read_only_folder_is_one_line(tmpfs):
    disk = tmpfs("1m")
    write_json({"a": 1}, disk / "metrics.json")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(SmoosegError) as err:
        write_json({"a": 2}, disk / "metrics.json")
    assert str(err.value).startswith(f"{disk} is on a read-only file system")
    assert (disk / "metrics.json").read_text().strip().endswith("}") and os.listdir(disk) == ["metrics.json"]


@pytest.mark.slow
def test_checkpoints_never_pass_through_tmpdir(data, tmp_path, tmpfs, monkeypatch):
    from lightning_fabric.utilities import cloud_io

    from smooseg.train.train import train

    other = tmpfs("1m", name="tmpdir")  # $TMPDIR on another file system than the run folder
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    monkeypatch.setenv("TMPDIR", str(other))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR

    def lightning_writer(*args, **kwargs):
        raise AssertionError("Lightning's own checkpoint writer (staged under $TMPDIR) was used")

    monkeypatch.setattr(cloud_io, "_atomic_save", lightning_writer)
    renames = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    result = train(train_settings(TINY + [f"data_dir={data}", f"output_dir={out}"]))
    assert Path(result["last"]).is_file() and Path(result["best"]).is_file()
    written = {dst.name for _, dst in renames}
    assert {"last.ckpt", Path(result["best"]).name, "config.yaml"} <= written
    assert all(src.parent == dst.parent for src, dst in renames), renames
    assert os.listdir(other) == []
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_kill_while_a_checkpoint_is_written_leaves_the_old_one(tmp_path):
    # a child process writing a big checkpoint is killed (SIGKILL) mid-write, many times over
    from smooseg.train.callbacks import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    script = ("import sys, torch; from smooseg.train.callbacks import AtomicCheckpointIO\n"
              "print('go', flush=True)\n"
              "while True:\n"
              "    AtomicCheckpointIO().save_checkpoint({'w': torch.zeros(4_000_000)}, sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for delay in (0.05, 0.2, 0.4):
        target.unlink(missing_ok=True)
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
        child = subprocess.Popen([sys.executable, "-c", script, str(target)], env=env, stdout=subprocess.PIPE)
        child.stdout.readline()
        time.sleep(delay)
        child.kill()
        child.wait()
        state = torch.load(target, weights_only=True)  # the old file or a whole new one, never torn
        assert state == {"step": 1} or state["w"].shape == (4_000_000,)
        for leftover in [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:
            leftover.unlink()  # SIGKILL cannot clean up: a hidden temporary file may remain, never last.ckpt


def one_error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_full_disk_while_extracting_leaves_no_partial_copy(tmpfs, tmp_path):
    import zipfile

    disk = tmpfs("3m")
    with zipfile.ZipFile(disk / "cityscapes.zip", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cityscapes/leftImg8bit/train/a.bin", os.urandom(2 * 1024 * 1024))
    proc = run_script("download_datasets.py", f"data_dir={disk}", "base_url=http://127.0.0.1:9/",
                      "datasets=[cityscapes]", "progress=false", check=False)
    line = one_error(proc)
    assert line.startswith(f"error: no space left in {disk}") and ".cityscapes.extracting was removed" in line
    assert sorted(os.listdir(disk)) == ["cityscapes.zip"]


def test_full_disk_while_downloading_keeps_the_part_to_resume(tmpfs, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    payload = os.urandom(3 * 1024 * 1024)

    class Serve(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    disk = tmpfs("1m")
    try:
        proc = run_script("download_datasets.py", f"data_dir={disk}", f"base_url=http://127.0.0.1:{httpd.server_address[1]}/",
                          "datasets=[cityscapes]", "progress=false", check=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    line = one_error(proc)
    assert line.startswith(f"error: no space left in {disk}") and "resumed by the next run" in line
    assert os.listdir(disk) == ["cityscapes.zip.part"]


@pytest.mark.slow
def test_full_disk_while_cropping_is_one_line_and_leaves_no_temporary_file(tmpfs, tmp_path):
    source = write_cityscapes_layout(tmp_path / "src", n_train=8, n_val=1, size=(256, 512))
    disk = tmpfs("200k")
    (disk / "cityscapes").symlink_to(source / "cityscapes")  # the sources take no room on the disk
    proc = run_script("crop_datasets.py", f"data_dir={disk}", "datasets=[cityscapes]", "num_workers=2",
                      "progress=false", check=False)
    line = one_error(proc)
    assert line.startswith(f"error: no space left in {disk / 'cropped'}"), line
    assert not [p for p in (disk / "cropped").rglob("*") if p.name.endswith(".tmp")]
