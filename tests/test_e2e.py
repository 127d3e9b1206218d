"""End to end on CPU through the entry points: train -> checkpoints -> eval with / without CRF."""

import json
import shutil

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import run_script, train_config
from smooseg.data.datasets import DatasetInfo
from smooseg.model.checkpoints import load_net
from smooseg.eval.evaluate import evaluate
from smooseg.train.datamodule import build_datasets
from smooseg.train.train import build_module

pytestmark = pytest.mark.slow


def test_training_writes_best_and_last_checkpoints(trained_run):
    out = trained_run["output_dir"]
    assert trained_run["best"] is not None and trained_run["best"].is_file()
    assert trained_run["last"].is_file()
    assert trained_run["best"].name.startswith("best-step") and "=" not in trained_run["best"].name
    assert (out / "config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = torch.load(trained_run["last"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 60  # last.ckpt is the final state (validated at max_steps)
    assert ckpt["hyper_parameters"]["runtime"]["pretrained"] is False


def _check_eval_dir(folder, n_images, size):
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("mIoU", "Accuracy"):
        assert 0.0 <= metrics[key] <= 100.0
    assert len(metrics["per_class_iou"]) == 27 and "road" in metrics["per_class_iou"]
    assert sorted(metrics["assignment"].values()) == list(range(27))  # a one-to-one matching
    for n in range(n_images):
        for kind in ("img", "label", "pred"):
            with Image.open(folder / f"{n}_{kind}.png") as im:
                assert im.size == (size, size) and im.mode == "RGB"
    assert not (folder / f"{n_images}_img.png").exists()
    return metrics


def test_eval_with_and_without_crf(trained_run, tmp_path):
    best, last = trained_run["best"], trained_run["last"]
    common = [f"data_dir={trained_run['data_dir']}", "n_images=2", "batch_size=4", "num_workers=0"]
    # dataset=synthetic names the checkpoint's own data set explicitly (the override path)
    run_script("eval_segmentation.py", f"model_paths=[{best}]", "crf=true", "crf_workers=1",
               "dataset=synthetic", "report=true", f"output_dir={tmp_path / 'crf'}", *common)
    # reference-style flags, two checkpoints in one run
    proc = run_script("eval_segmentation.py", "--model_paths", f"[{best},{last}]", "--crf", "false",
                      "--output_dir", tmp_path / "plain", *common)
    with_crf = _check_eval_dir(tmp_path / "crf" / best.stem, 2, 64)
    plain = _check_eval_dir(tmp_path / "plain" / best.stem, 2, 64)
    _check_eval_dir(tmp_path / "plain" / "last", 2, 64)
    assert with_crf["crf"] is True and plain["crf"] is False and "nocrf" not in plain
    assert with_crf["n_evaluated"] == plain["n_evaluated"] == 8  # every val image counts
    assert with_crf["nocrf"]["mIoU"] == pytest.approx(plain["mIoU"])
    assert with_crf["nocrf"]["Accuracy"] == pytest.approx(plain["Accuracy"])
    assert "mIoU" in proc.stdout and "road" in proc.stdout  # the printed per-class table
    for picture in ("per_class_iou.png", "confusion.png", "examples.png"):  # report=true
        assert Image.open(tmp_path / "crf" / best.stem / picture).size[0] > 100
    assert not (tmp_path / "plain" / best.stem / "confusion.png").exists()  # report is off by default
    label = np.asarray(Image.open(tmp_path / "plain" / "last" / "0_label.png"))
    assert (128, 64, 128) in {tuple(c) for c in label.reshape(-1, 3)}  # Cityscapes road colour


def test_crf_backends_give_the_same_metrics(trained_run, tmp_path):
    """The torch CRF and pydensecrf through the real entry point: mIoU and Accuracy within 0.05."""
    common = [f"model_paths=[{trained_run['last']}]", f"data_dir={trained_run['data_dir']}", "crf=true",
              "n_images=0", "batch_size=4", "num_workers=0", "crf_workers=0"]
    metrics = {}
    for backend in ("pydensecrf", "torch"):
        run_script("eval_segmentation.py", *common, f"crf_backend={backend}", f"output_dir={tmp_path / backend}")
        metrics[backend] = json.loads((tmp_path / backend / "last" / "metrics.json").read_text())
    for key in ("mIoU", "Accuracy"):
        assert metrics["torch"][key] == pytest.approx(metrics["pydensecrf"][key], abs=0.05)
        assert metrics["torch"]["nocrf"][key] == metrics["pydensecrf"]["nocrf"][key]
    assert metrics["torch"]["mIoU"] != metrics["torch"]["nocrf"]["mIoU"]  # the CRF did change pixels


def test_trained_beats_untrained(trained_run):
    cfg = train_config(trained_run["overrides"])
    pl.seed_everything(int(cfg.seed), workers=True)
    untrained = build_module(cfg)  # the initial weights of the training run
    _, val_set = build_datasets(cfg)
    loader = DataLoader(val_set, batch_size=8)
    before, _ = evaluate(untrained.net, loader, untrained.data, flip=True, show_progress=False)
    trained, hparams = load_net(trained_run["last"])
    after, _ = evaluate(trained, loader, DatasetInfo(**hparams["data"]), flip=True, show_progress=False)
    assert after["mIoU"] > before["mIoU"] + 5.0, (before["mIoU"], after["mIoU"])
    assert after["Accuracy"] > before["Accuracy"] + 10.0, (before["Accuracy"], after["Accuracy"])


def test_resume_from_last(trained_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained_run["output_dir"] / "checkpoints", out / "checkpoints")
    overrides = [o for o in trained_run["overrides"] if not o.startswith(("output_dir=", "max_steps="))]
    run_script("train_segmentation.py", *overrides, f"output_dir={out}", "max_steps=64",
               "ckpt_path=last", "logger=none")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 64


def test_resume_from_a_checkpoint_of_the_earlier_layout(trained_run, tmp_path):
    """A last.ckpt written before the hyper-parameters were grouped (flat, keys without "net.")
    still resumes: it is converted on load."""
    ckpt = torch.load(trained_run["last"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    flat = {**{k: v for k, v in hp["net"].items() if k not in ("n_clusters", "linear_probe_classes")},
            **hp["loss"], **hp["optim"], **hp["metrics"], **hp["diagnostics"],
            "n_classes": hp["data"]["n_classes"], "dataset_name": hp["data"]["name"],
            "eval_res": hp["data"]["eval_res"], "extra_clusters": 0}
    ckpt["hyper_parameters"] = flat
    ckpt["state_dict"] = {k[len("net."):]: v for k, v in ckpt["state_dict"].items()}
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, out / "checkpoints" / "last.ckpt")
    overrides = [o for o in trained_run["overrides"] if not o.startswith(("output_dir=", "max_steps="))]
    run_script("train_segmentation.py", *overrides, f"output_dir={out}", "max_steps=62", "ckpt_path=last",
               "logger=none")
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 62 and "net" in resumed["hyper_parameters"]
    assert all(k.startswith("net.") for k in resumed["state_dict"])


def test_user_errors_are_one_line(tmp_path):
    proc = run_script("train_segmentation.py", "experiment=demo", "model.pretrained=false",
                      f"data_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1]
    proc = run_script("eval_segmentation.py", f"model_paths=[{tmp_path / 'missing.ckpt'}]", "crf=false",
                      f"output_dir={tmp_path / 'eval'}", check=False)
    assert proc.returncode == 2 and "missing.ckpt" in proc.stderr and "not found" in proc.stderr
