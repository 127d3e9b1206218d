"""End to end on CPU through the entry points: train -> checkpoints -> final evaluation -> eval with /
without CRF; several seeds (multirun) and the summaries over jobs and checkpoints."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from conftest import TRAIN_OVERRIDES, run_script, train_settings
from smooseg.data.datasets import DatasetInfo
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout
from smooseg.eval.evaluate import evaluate
from smooseg.eval.results import spread
from smooseg.model.checkpoints import load_net
from smooseg.train.datamodule import build_datasets
from smooseg.train.train import build_module, train

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


def _result_dir(output_dir, checkpoint):
    """Where eval_segmentation.py puts a checkpoint's results: <stem>-<first 10 hex of its sha256>."""
    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    return Path(output_dir) / f"{Path(checkpoint).stem}-{sha[:10]}"


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
    crf_dir, plain_dir = _result_dir(tmp_path / "crf", best), _result_dir(tmp_path / "plain", best)
    last_dir = _result_dir(tmp_path / "plain", last)
    with_crf = _check_eval_dir(crf_dir, 2, 64)
    plain = _check_eval_dir(plain_dir, 2, 64)
    _check_eval_dir(last_dir, 2, 64)
    assert with_crf["crf"] is True and plain["crf"] is False and "nocrf" not in plain
    assert with_crf["n_evaluated"] == plain["n_evaluated"] == 8  # every val image counts
    assert with_crf["nocrf"]["mIoU"] == pytest.approx(plain["mIoU"])
    assert with_crf["nocrf"]["Accuracy"] == pytest.approx(plain["Accuracy"])
    assert "mIoU" in proc.stdout and "road" in proc.stdout  # the printed per-class table
    for picture in ("per_class_iou.png", "confusion.png", "examples.png"):  # report=true
        assert Image.open(crf_dir / picture).size[0] > 100
    assert not (plain_dir / "confusion.png").exists()  # report is off by default
    sources = {p.stem.removesuffix("_leftImg8bit")   # a Cityscapes item is named by its scene id
               for p in (trained_run["data_dir"] / "cityscapes" / "leftImg8bit" / "val").rglob("*.png")}
    sides = sorted(p.name[:-len("_side.png")] for p in plain_dir.glob("*_side.png"))
    assert len(sides) == 2 and set(sides) <= sources      # named after the source files
    label = np.asarray(Image.open(last_dir / "0_label.png"))
    assert (128, 64, 128) in {tuple(c) for c in label.reshape(-1, 3)}  # Cityscapes road colour


def test_crf_backends_give_the_same_metrics(trained_run, tmp_path):
    """The torch CRF and pydensecrf through the real entry point: mIoU and Accuracy within 0.05."""
    common = [f"model_paths=[{trained_run['last']}]", f"data_dir={trained_run['data_dir']}", "crf=true",
              "n_images=0", "batch_size=4", "num_workers=0", "crf_workers=0"]
    metrics = {}
    for backend in ("pydensecrf", "torch"):
        run_script("eval_segmentation.py", *common, f"crf_backend={backend}",
                   f"output_dir={tmp_path / backend}")
        result_dir = _result_dir(tmp_path / backend, trained_run["last"])
        metrics[backend] = json.loads((result_dir / "metrics.json").read_text())
    for key in ("mIoU", "Accuracy"):
        assert metrics["torch"][key] == pytest.approx(metrics["pydensecrf"][key], abs=0.05)
        assert metrics["torch"]["nocrf"][key] == metrics["pydensecrf"]["nocrf"][key]
    assert metrics["torch"]["mIoU"] != metrics["torch"]["nocrf"]["mIoU"]  # the CRF did change pixels


def test_trained_beats_untrained(trained_run):
    cfg = train_settings(trained_run["overrides"])
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


def test_user_errors_are_one_line(tmp_path, entry_point):
    proc = entry_point("train_segmentation.py", "experiment=demo", "model.pretrained=false",
                       f"data_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1]
    proc = entry_point("eval_segmentation.py", f"model_paths=[{tmp_path / 'missing.ckpt'}]", "crf=false",
                       f"output_dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and "missing.ckpt" in proc.stderr and "not found" in proc.stderr


# ---- the final evaluation after training, several seeds, summaries over checkpoints

HEADLINE_KEYS = ("mIoU", "Accuracy", "per_class_iou", "assignment", "confusion", "n_evaluated", "flip", "crf")


def by_hand(values):
    """mean, sample standard deviation (n - 1 in the denominator), min, max."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return {"n": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def assert_spread(block, values):
    expected = by_hand(values)
    assert block["n"] == expected["n"]
    for key in ("mean", "std", "min", "max"):
        assert block[key] == (None if expected[key] is None else pytest.approx(expected[key], abs=1e-9)), key


def test_final_evaluation_equals_eval_script(trained_run, tmp_path):
    """train_segmentation.py ends with the best checkpoint evaluated as eval_segmentation.py would
    (val split, eval_res, flip, no CRF): the same numbers, the table printed."""
    final = json.loads((trained_run["output_dir"] / "final_eval" / "metrics.json").read_text())
    assert final["checkpoint"] == str(trained_run["best"])
    assert (final["flip"], final["crf"], final["n_evaluated"]) == (True, False, 8) and "nocrf" not in final
    run_script("eval_segmentation.py", f"model_paths=[{trained_run['best']}]",
               f"data_dir={trained_run['data_dir']}", "eval_res=64", "crf=false", "flip=true", "n_images=0",
               "num_workers=0", f"output_dir={tmp_path}")
    separate = json.loads((_result_dir(tmp_path, trained_run["best"]) / "metrics.json").read_text())
    for key in HEADLINE_KEYS:
        assert final[key] == separate[key], key
    stdout = trained_run["stdout"]
    assert "final evaluation: the val split at 64x64, flip on, CRF off" in stdout
    assert f"mIoU: {final['mIoU']:.2f}   Accuracy: {final['Accuracy']:.2f}" in stdout  # the table's last line
    assert not list((trained_run["output_dir"] / "final_eval").glob("*.png"))  # final_eval.n_images=0


def tiny_train_cfg(data_dir, output_dir, *extra):
    return train_settings(["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32",
                         "eval_res=32", "batch_size=2", "num_workers=0", "logger=none", "max_steps=2",
                         "val_check_interval=2", "trainer.enable_progress_bar=false",
                         "+trainer.enable_model_summary=false", f"data_dir={data_dir}",
                         f"output_dir={output_dir}", *extra])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return write_cityscapes_layout(root / "data", n_train=4, n_val=2, size=(32, 64), seed=0)


def test_final_evaluation_with_crf_is_train_result(small_data, tmp_path, capsys):
    """One override turns the CRF on; train() returns the headline of the JSON it wrote."""
    result = train(tiny_train_cfg(small_data, tmp_path, "final_eval.crf=true", "final_eval.crf_workers=0",
                                  "final_eval.n_images=1"))
    metrics = json.loads((tmp_path / "final_eval" / "metrics.json").read_text())
    assert result["final_eval"] == {"checkpoint": result["best"],
                                    "metrics": str(tmp_path / "final_eval" / "metrics.json"),
                                    "crf": True, "mIoU": metrics["mIoU"], "Accuracy": metrics["Accuracy"]}
    assert metrics["crf"] is True and "nocrf" in metrics and metrics["n_evaluated"] == 2
    assert (tmp_path / "final_eval" / "0_pred.png").is_file()
    assert not (tmp_path / "final_eval" / "1_pred.png").exists()
    assert "IoU+CRF" in capsys.readouterr().out


def test_final_evaluation_skipped_when_disabled_or_unlabelled(small_data, tmp_path, capsys):
    off = train(tiny_train_cfg(small_data, tmp_path / "off", "final_eval.enabled=false"))
    assert off["final_eval"] is None and off["last"] is not None
    assert not (tmp_path / "off" / "final_eval").exists()
    data = write_directory_layout(tmp_path / "mine", name="mine", n_train=4, n_val=2, size=(32, 32),
                                  with_labels=False)
    capsys.readouterr()
    unlabelled = train(tiny_train_cfg(data, tmp_path / "unlabelled", "dataset=directory",
                                      "dataset.dir_name=mine", "dataset.n_classes=6"))
    assert unlabelled["final_eval"] is None and unlabelled["last"] is not None
    assert not (tmp_path / "unlabelled" / "final_eval").exists()
    assert "final evaluation skipped: the validation images have no labels" in capsys.readouterr().out


def test_multirun_over_seeds(synthetic_data, tmp_path, entry_point):
    """-m seed=0,1: each job in its own folder with its own final evaluation, then the summary over
    the jobs (mean ± sample std, min, max) in the sweep folder; a later sweep into the same folder
    is refused (it would overwrite job 0); a one-job sweep has no standard deviation."""
    overrides = [o for o in TRAIN_OVERRIDES
                 if not o.startswith(("seed=", "max_steps=", "val_check_interval="))]
    overrides += ["max_steps=2", "val_check_interval=2", "logger=none", f"data_dir={synthetic_data}",
                  f"output_dir={tmp_path}"]
    proc = run_script("train_segmentation.py", "-m", *overrides, "seed=0,1")
    jobs = [json.loads((tmp_path / job / "final_eval" / "metrics.json").read_text()) for job in ("0", "1")]
    for job, metrics in zip(("0", "1"), jobs, strict=True):
        assert OmegaConf.load(tmp_path / job / "config.yaml").seed == int(job)
        assert OmegaConf.load(tmp_path / job / "config.yaml").output_dir == str(tmp_path / job)
        assert metrics["checkpoint"].startswith(str(tmp_path / job / "checkpoints" / "best-"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 2 and "ddof=1" in summary["std"]
    assert [(r["job"], r["seed"], r["checkpoint"]) for r in summary["runs"]] == [
        ("0", 0, jobs[0]["checkpoint"]), ("1", 1, jobs[1]["checkpoint"])]
    for key in ("mIoU", "Accuracy"):
        assert [r[key] for r in summary["runs"]] == [m[key] for m in jobs]
        assert_spread(summary[key], [m[key] for m in jobs])
        assert summary[key]["std"] == pytest.approx(abs(jobs[0][key] - jobs[1][key]) / 2 ** 0.5)
    assert "summary over 2 jobs" in proc.stdout and f"summary: {tmp_path / 'summary.json'}" in proc.stdout

    before = (tmp_path / "summary.json").read_text()
    refused = entry_point("train_segmentation.py", "-m", *overrides, "seed=5")
    assert refused.returncode == 2 and "already holds a run" in refused.stderr  # job 0 is not overwritten
    assert (tmp_path / "summary.json").read_text() == before

    single = tmp_path / "single"
    one = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={single}"]
    run_script("train_segmentation.py", "-m", *one, "seed=5")
    again = json.loads((single / "summary.json").read_text())
    fresh = json.loads((single / "0" / "final_eval" / "metrics.json").read_text())
    assert [(r["job"], r["seed"]) for r in again["runs"]] == [("0", 5)]
    value = fresh["mIoU"]
    assert again["mIoU"] == {"n": 1, "mean": value, "std": None, "min": value, "max": value}


def test_eval_summary_over_checkpoints_and_a_glob(trained_run, tmp_path):
    """Two checkpoints that predict differently (the trained one and a copy with a perturbed
    projector), named as a list and as a glob pattern: the same summary, computed by hand."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    trained = shutil.copy(trained_run["best"], folder / "a_trained.ckpt")
    ckpt = torch.load(trained_run["best"], map_location="cpu", weights_only=True)
    weight = ckpt["state_dict"]["net.projector.linear.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    ckpt["state_dict"]["net.projector.linear.weight"] = weight + noise
    torch.save(ckpt, folder / "b_perturbed.ckpt")
    paths = [str(trained), str(folder / "b_perturbed.ckpt")]
    common = [f"data_dir={trained_run['data_dir']}", "crf=false", "n_images=0", "num_workers=0"]
    proc = run_script("eval_segmentation.py", f"model_paths=[{','.join(paths)}]", *common,
                      f"output_dir={tmp_path / 'list'}")
    listed = json.loads((tmp_path / "list" / "summary.json").read_text())
    each = [json.loads((_result_dir(tmp_path / "list", path) / "metrics.json").read_text()) for path in paths]
    assert [r["checkpoint"] for r in listed["runs"]] == paths and listed["n"] == 2
    assert each[0]["mIoU"] != each[1]["mIoU"]
    for key in ("mIoU", "Accuracy"):
        assert [r[key] for r in listed["runs"]] == [m[key] for m in each]
        assert_spread(listed[key], [m[key] for m in each])
    assert "summary over 2 checkpoints (mean ± sample std, ddof=1)" in proc.stdout
    mean, std = listed["mIoU"]["mean"], listed["mIoU"]["std"]
    assert re.search(rf"^mIoU +{mean:.2f} ± {std:.2f} ", proc.stdout, re.M), proc.stdout[-800:]

    run_script("eval_segmentation.py", f"model_paths={folder}/*.ckpt", *common,
               f"output_dir={tmp_path / 'glob'}")
    globbed = json.loads((tmp_path / "glob" / "summary.json").read_text())
    assert [r["checkpoint"] for r in globbed["runs"]] == paths  # sorted matches
    assert {k: globbed[k] for k in ("mIoU", "Accuracy")} == {k: listed[k] for k in ("mIoU", "Accuracy")}


def test_spread_is_the_sample_standard_deviation():
    block = spread([10.0, 12.0, None, 17.0])  # nulls (undefined metrics) are left out
    assert block == {"n": 3, "mean": 13.0, "std": pytest.approx(13 ** 0.5), "min": 10.0, "max": 17.0}
    assert spread([4.0]) == {"n": 1, "mean": 4.0, "std": None, "min": 4.0, "max": 4.0}
    assert spread([]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None}
