"""The shared path checks (smooseg.io.check_output_dir / check_input_file / check_input_dir), the
CUDA accelerator check, the evaluation's data set / checkpoint checks and its clean output folder.

Runs as root here: mode bits do not stop root, so "not writable" is simulated by a failing probe
file (and, where the machine has one, a read-only mount); the not-a-folder cases are real.
"""

import os
import tempfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from smooseg.data.datasets import DatasetInfo
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import check_checkpoints, check_dataset_matches, checkpoint_paths
from smooseg.eval.results import REPORT_PICTURES, clear_outputs, write_outputs
from smooseg.io import check_input_dir, check_input_file, check_output_dir
from smooseg.runtime import check_accelerator, resolve_device
from smooseg.settings import DatasetSettings


def one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_output_dir_ok_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "output_dir") == target
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    (tmp_path / "c").mkdir()
    check_output_dir(tmp_path / "c", "output_dir")
    assert list((tmp_path / "c").iterdir()) == []


def test_output_dir_is_a_file_or_under_one(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SmoosegError) as err:
        check_output_dir(tmp_path / "f", "output_dir")
    assert f"output_dir={tmp_path / 'f'} is an existing file" in one_line(err)
    with pytest.raises(SmoosegError) as err:
        check_output_dir(tmp_path / "f" / "sub" / "deeper", "cache.dir")
    line = one_line(err)
    assert line.startswith(f"cache.dir={tmp_path / 'f' / 'sub' / 'deeper'} cannot be created")
    assert f"{tmp_path / 'f'} is a file" in line and "pass cache.dir=" in line


def test_output_dir_not_writable(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SmoosegError) as err:
        check_output_dir(tmp_path / "new", "output_dir")
    line = one_line(err)
    assert "is not writable" in line and f"it would be created in {tmp_path}" in line
    assert "Permission denied" in line and "pass output_dir=" in line


def test_output_dir_on_a_read_only_mount():
    """A real read-only place (the probe is what sees it; root passes every mode-bit check)."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    with pytest.raises(SmoosegError, match=r"output_dir=/sys/smooseg_out is not writable"):
        check_output_dir("/sys/smooseg_out", "output_dir")


def test_input_file_and_dir(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"x")
    assert check_input_file(tmp_path / "w.pth", "model.weights_path") == tmp_path / "w.pth"
    with pytest.raises(SmoosegError) as err:
        check_input_file(tmp_path / "nope.pth", "model.weights_path", fix="point it at the file")
    assert one_line(err) == f"model.weights_path={tmp_path / 'nope.pth'} does not exist; point it at the file"
    with pytest.raises(SmoosegError, match="is a folder, not a file"):
        check_input_file(tmp_path, "model.weights_path")
    with pytest.raises(SmoosegError, match=r"data_dir=.* is a file, not a folder"):
        check_input_dir(tmp_path / "w.pth", "data_dir")
    with pytest.raises(SmoosegError, match=r"data_dir=.* does not exist"):
        check_input_dir(tmp_path / "none", "data_dir")
    real_open = open

    def unreadable(path, *args, **kwargs):
        if str(path).endswith("w.pth"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    with pytest.raises(SmoosegError, match=r"w\.pth cannot be read \(\[Errno 13\] Permission denied\)"):
        check_input_file(tmp_path / "w.pth", "model.weights_path")


def test_weights_path_a_folder(tmp_path):
    from smooseg.model.weights import resolve_weights

    with pytest.raises(SmoosegError) as err:
        resolve_weights("dino", "vit_small", 16, weights_path=tmp_path)
    assert f"model.weights_path={tmp_path} is a folder, not a file" in one_line(err)


def test_cuda_accelerator_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(SmoosegError) as err:
            check_accelerator(accelerator)
        assert f"trainer.accelerator={accelerator}" in one_line(err) and "no CUDA GPU" in str(err.value)
    assert check_accelerator("cpu") == "cpu" and check_accelerator("auto") == "auto"
    with pytest.raises(SmoosegError, match="device=cuda: this machine has no CUDA GPU"):
        resolve_device("cuda")


def test_dataset_must_match_the_checkpoint():
    cityscapes = DatasetInfo(n_classes=27, name="cityscapes")
    group = lambda **kw: DatasetSettings(**{"name": "directory", "n_classes": None, **kw})  # noqa: E731
    check_dataset_matches(group(), cityscapes)  # n_classes left unset: the checkpoint's
    check_dataset_matches(group(n_classes=27), cityscapes)
    check_dataset_matches(group(name="cityscapes", n_classes=None), cityscapes)
    with pytest.raises(SmoosegError) as err:
        check_dataset_matches(group(n_classes=5), cityscapes)
    assert one_line(err).startswith("dataset.n_classes=5 contradicts the checkpoint, trained for 27 classes")
    with pytest.raises(SmoosegError,
                       match="dataset=cocostuff27 contradicts the checkpoint, trained on cityscapes"):
        check_dataset_matches(group(name="cocostuff27", n_classes=None), cityscapes)
    # a directory-trained checkpoint on a named set of the same size, and the other way round
    check_dataset_matches(group(name="cityscapes", n_classes=None), DatasetInfo(n_classes=27))


def test_checkpoints_all_checked_first(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "b.ckpt").write_bytes(b"x")
    # a glob that matches a folder: the folder is named
    paths = checkpoint_paths(OmegaConf.create([str(tmp_path / "runs" / "*")]))
    assert paths == [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b.ckpt")]
    with pytest.raises(SmoosegError) as err:
        check_checkpoints(paths)
    assert one_line(err).startswith(f"checkpoint {tmp_path / 'runs' / 'a'} is a folder, not a file")
    with pytest.raises(SmoosegError,
                       match=r"checkpoint .*last\.ckpt not found.*'model_paths=\[\"a=b\.ckpt\"\]'"):
        check_checkpoints([str(tmp_path / "runs" / "b.ckpt"), str(tmp_path / "last.ckpt")])
    with pytest.raises(SmoosegError, match="braces are not expanded"):
        check_checkpoints([str(tmp_path / "runs" / "{a,b}.ckpt")])
    check_checkpoints([str(tmp_path / "runs" / "b.ckpt")])


def test_report_picture_names_agree():
    from smooseg.eval.report import REPORT_FILES

    assert sorted(REPORT_PICTURES) == sorted(REPORT_FILES.values())


def _examples(n):
    return [(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), torch.zeros(4, 4, dtype=torch.long))
            for _ in range(n)]


def test_outputs_replace_an_earlier_evaluation(tmp_path):
    data = DatasetInfo(n_classes=3, name="potsdam")
    metrics = {"assignment": {name: i for i, name in enumerate(data.class_names)}}
    write_outputs(metrics, _examples(4), data, 3, tmp_path)
    for name in REPORT_PICTURES + ("notes.txt", "12_other.png"):
        (tmp_path / name).write_bytes(b"x")
    write_outputs(metrics, _examples(1), data, 3, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0_img.png", "0_label.png", "0_pred.png", "12_other.png", "metrics.json", "notes.txt"]
    assert clear_outputs(tmp_path / "absent") == []


@pytest.mark.slow
def test_eval_into_the_same_folder_keeps_only_its_own_pictures(tmp_path):
    """eval_segmentation.py with n_images=4, then n_images=1 (report=true, then false) into the
    same output_dir: only 0_*.png and this run's metrics.json remain."""
    from conftest import make_module, run_script
    from smooseg.data.synthetic import write_cityscapes_layout

    data = write_cityscapes_layout(tmp_path / "data", n_train=1, n_val=4, size=(32, 64), seed=0)
    torch.manual_seed(0)
    module = make_module(n_classes=27, dataset_name="cityscapes", model_type="vit_small", patch_size=16,
                         eval_res=32)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "epoch": 0, "global_step": 0}, ckpt)
    common = [f"model_paths=[{ckpt}]", f"data_dir={data}", f"output_dir={tmp_path / 'eval'}", "crf=false",
              "num_workers=0", "batch_size=2", "device=cpu"]
    run_script("eval_segmentation.py", *common, "n_images=4", "report=true")
    folder = next((tmp_path / "eval").glob("model-*"))
    assert {f"{n}_pred.png" for n in range(4)} <= {p.name for p in folder.iterdir()}
    run_script("eval_segmentation.py", *common, "n_images=1")
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith("_side.png")) == [
        "0_img.png", "0_label.png", "0_pred.png", "metrics.json"]
    assert len(list(folder.glob("*_side.png"))) == 1
    assert not list(tmp_path.glob("*.log")) and not list((tmp_path / "eval").glob("*.log"))
