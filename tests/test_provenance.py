"""Results that carry their provenance and never overwrite each other (eval_segmentation.py)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_module, run_script
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import checkpoint_paths, output_names
from smooseg.eval.provenance import check_same_settings, setting_differences
from smooseg.eval.results import claim_results_dir

ROOT = Path(__file__).resolve().parents[1]
EVALUATION_KEYS = {"dataset", "split", "eval_res", "crop", "flip", "crf", "crf_backend", "precision",
                   "n_images"}


def _checkpoint(path, seed, eval_res=64):
    torch.manual_seed(seed)
    module = make_module(n_classes=27, dataset_name="cityscapes", patch_size=16, eval_res=eval_res)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs whose checkpoints are both called last.ckpt, and one validated at another res."""
    root = tmp_path_factory.mktemp("runs")
    return {"a": _checkpoint(root / "a" / "last.ckpt", 0), "b": _checkpoint(root / "b" / "last.ckpt", 1),
            "other_res": _checkpoint(root / "c" / "last.ckpt", 2, eval_res=96)}


def _eval(data, out, *paths, check=True, extra=()):
    return run_script("eval_segmentation.py", f"model_paths=[{','.join(map(str, paths))}]",
                      f"data_dir={data}", "crf=false", "n_images=1", "num_workers=0", "batch_size=4",
                      "device=cpu", f"output_dir={out}", *extra, check=check)


@pytest.fixture(scope="module")
def evaluated(synthetic_data, runs, tmp_path_factory):
    """Run A's last.ckpt evaluated into a folder, then run B's (also last.ckpt) into the same one,
    and A's again without flipping into another; with what the folder held after the first."""
    root = tmp_path_factory.mktemp("evaluated")
    shared = root / "shared"
    _eval(synthetic_data, shared, runs["a"])
    first = {"folders": [p for p in shared.iterdir() if p.is_dir()],
             "metrics": json.loads(next(shared.glob("last-*/metrics.json")).read_text()),
             "summary": json.loads((shared / "summary.json").read_text())}
    _eval(synthetic_data, shared, runs["b"])
    _eval(synthetic_data, root / "noflip", runs["a"], extra=["flip=false"])
    return {"shared": shared, "first": first, "noflip": root / "noflip"}


def test_metrics_and_summary_record_their_provenance(runs, evaluated):
    (folder,) = evaluated["first"]["folders"]
    sha = hashlib.sha256(runs["a"].read_bytes()).hexdigest()
    assert folder.name == f"last-{sha[:10]}"
    prov = evaluated["first"]["metrics"]["provenance"]
    assert set(prov["evaluation"]) == EVALUATION_KEYS
    assert prov["evaluation"] == {"dataset": "cityscapes", "split": "val", "eval_res": 64, "crop": "center",
                                  "flip": True, "crf": False, "crf_backend": None, "precision": "32-true",
                                  "n_images": 8}
    assert prov["checkpoint"]["path"] == str(runs["a"].resolve()) and prov["checkpoint"]["sha256"] == sha
    assert prov["checkpoint"]["backbone"] == {"arch": "dino", "model_type": "vit_small", "patch_size": 16}
    assert prov["checkpoint"]["weights"] == "random init"   # make_module: pretrained=False
    assert set(prov["software"]) == {"smooseg", "git_commit", "torch", "timm", "python"}
    assert prov["software"]["torch"] == torch.__version__ and prov["device"] == "cpu" and prov["date"]
    summary = evaluated["first"]["summary"]
    assert summary["provenance"]["evaluation"]["eval_res"] == 64
    assert summary["runs"][0]["provenance"]["checkpoint"]["sha256"] == sha


def test_evaluations_of_two_last_ckpts_never_share_a_folder(runs, evaluated):
    results = sorted(evaluated["shared"].glob("last-*/metrics.json"))
    assert len(results) == 2
    kept = [json.loads(p.read_text()) for p in results]
    assert evaluated["first"]["metrics"] in kept           # A's result survives B's evaluation
    summary = json.loads((evaluated["shared"] / "summary.json").read_text())
    assert [r["checkpoint"] for r in summary["runs"]] == [str(runs["b"])]   # only this invocation's


def test_a_second_evaluation_into_a_busy_folder_is_refused(synthetic_data, runs, tmp_path):
    with claim_results_dir(tmp_path):
        proc = _eval(synthetic_data, tmp_path, runs["a"], check=False)
    assert proc.returncode != 0
    assert "is being written by another evaluation" in proc.stderr
    assert not list(tmp_path.glob("last-*"))
    with claim_results_dir(tmp_path), pytest.raises(SmoosegError, match="another evaluation"):
        with claim_results_dir(tmp_path):
            pass


def test_summary_refuses_to_average_different_settings(synthetic_data, runs, tmp_path):
    proc = _eval(synthetic_data, tmp_path, runs["a"], runs["other_res"], check=False, extra=["eval_res=null"])
    assert proc.returncode != 0
    assert "will not average" in proc.stderr and "eval_res 64 vs 96" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_compare_two_results(runs, evaluated, tmp_path, entry_point):
    a, b = (evaluated["shared"] / f"last-{hashlib.sha256(runs[n].read_bytes()).hexdigest()[:10]}"
            / "metrics.json" for n in ("a", "b"))
    (no_flip,) = evaluated["noflip"].glob("last-*/metrics.json")
    differ = entry_point("eval_segmentation.py", "--compare", a, no_flip, cwd=tmp_path)
    assert differ.returncode == 1 and "different evaluation settings: flip" in differ.stdout
    assert any(line.startswith("* evaluation.flip") for line in differ.stdout.splitlines())
    same = entry_point("eval_segmentation.py", "--compare", a, b, cwd=tmp_path)
    assert same.returncode == 0 and "same evaluation settings" in same.stdout
    assert any(line.startswith("* checkpoint.sha256") for line in same.stdout.splitlines())
    bad = entry_point("eval_segmentation.py", "--compare", a, tmp_path / "missing.json", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.json'} not found; pass two metrics.json or summary.json files"]


def test_setting_differences_by_hand():
    one = {"evaluation": {"eval_res": 320, "flip": True, "n_images": 500}}
    assert setting_differences(one, {"evaluation": {"eval_res": 320, "flip": True, "n_images": 3}}) == {}
    other_res = {"evaluation": {"eval_res": 224, "flip": True}}
    assert setting_differences(one, other_res) == {"eval_res": (320, 224)}
    check_same_settings([{"checkpoint": "a", "provenance": one}, {"checkpoint": "b", "provenance": None}])
    with pytest.raises(SmoosegError, match="flip True vs False"):
        no_flip = {"evaluation": {"eval_res": 320, "flip": False}}
        check_same_settings([{"checkpoint": "a", "provenance": one},
                             {"checkpoint": "b", "provenance": no_flip}])


def test_literal_paths_are_not_patterns_and_names_are_by_content(tmp_path, runs):
    odd = tmp_path / "run[1]" / "last.ckpt"
    odd.parent.mkdir()
    shutil.copy(runs["a"], odd)
    (tmp_path / "run1").mkdir()
    shutil.copy(runs["b"], tmp_path / "run1" / "last.ckpt")   # what run[1] would match as a pattern
    assert checkpoint_paths([str(odd)]) == [str(odd)]
    names = output_names([runs["a"], runs["b"], odd])
    assert names[0] != names[1] and names[2] == names[0] + "_2"
