"""logger=csv | wandb (offline) | mlflow | tensorboard | none: each records the run folder, the
resolved config and the final evaluation's headline, and says where its files went."""

import csv
import importlib.util
import json
import re

import pytest
import yaml

from smooseg.errors import SmoosegError
from smooseg.train.loggers import build_logger, flatten, log_final_eval, log_run
from tests.conftest import TRAIN_OVERRIDES, run_script

TINY = [o for o in TRAIN_OVERRIDES if not o.startswith(("max_steps", "val_check_interval"))] + [
    "max_steps=4", "val_check_interval=2", "batch_size=4"]


def tiny_run(synthetic_data, output_dir, logger):
    return run_script("train_segmentation.py", *TINY, f"data_dir={synthetic_data}",
                      f"output_dir={output_dir}", f"logger={logger}")


def headline(output_dir):
    metrics = json.loads((output_dir / "final_eval" / "metrics.json").read_text())
    return metrics["mIoU"], metrics["Accuracy"]


def test_flatten_joins_sections_and_keeps_lists_whole():
    assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {"a": 1, "b/c": "[1, 2]", "b/d/e": None}


def test_unknown_type_is_one_line_naming_the_choices(tmp_path):
    with pytest.raises(SmoosegError, match=r"logger.type=comet is unknown; use logger=<tensorboard \| csv"):
        build_logger("comet", tmp_path)
    assert build_logger("none", tmp_path) is False
    assert not list(tmp_path.iterdir())


def test_csv_records_config_and_headline_by_hand(tmp_path, capsys):
    logger = build_logger("csv", tmp_path / "run")
    log_run(logger, tmp_path / "run", {"seed": 3, "loss": {"temperature": 0.1}})
    log_final_eval(logger, {"mIoU": 12.5, "Accuracy": 60.0, "crf": False}, step=7)
    hparams = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert hparams["seed"] == 3 and hparams["loss/temperature"] == 0.1
    assert hparams["run/output_dir"] == str((tmp_path / "run").resolve())
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    assert [(r["step"], float(r["final_eval/mIoU"]), float(r["final_eval/Accuracy"])) for r in rows] == [
        ("7", 12.5, 60.0)]
    assert f"logger: CSV files in {tmp_path / 'run' / 'csv'}" in capsys.readouterr().out


@pytest.mark.slow
def test_logger_csv_writes_metrics_and_config_in_a_tiny_run(synthetic_data, tmp_path):
    out = tmp_path / "run"
    proc = tiny_run(synthetic_data, out, "csv")
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    final = [r for r in rows if r["final_eval/mIoU"]]
    assert len(final) == 1
    assert (float(final[0]["final_eval/mIoU"]), float(final[0]["final_eval/Accuracy"])) == pytest.approx(
        headline(out))
    assert any(r["train/loss"] for r in rows) and any(r["val/cluster/mIoU"] for r in rows)
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hparams["run/output_dir"] == str(out.resolve()) and hparams["max_steps"] == 4
    assert not (out / "tensorboard").exists()
    assert f"logger: CSV files in {out / 'csv'}" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_logger_wandb_offline_writes_its_run_and_says_where(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    proc = tiny_run(synthetic_data, out, "wandb")
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))
    assert f"logger: W&B offline run in {run_dir}; upload it with: wandb sync {run_dir}" in proc.stdout
    # an offline run keeps its records in the binary run-*.wandb; W&B prints the run's summary
    summary = dict(re.findall(r"wandb:\s+(final_eval/\w+) ([\d.]+)", proc.stdout + proc.stderr))
    assert (float(summary["final_eval/mIoU"]), float(summary["final_eval/Accuracy"])) == pytest.approx(
        headline(out), abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_logger_mlflow_file_store_records_params_and_headline(synthetic_data, tmp_path):
    out = tmp_path / "run"
    proc = tiny_run(synthetic_data, out, "mlflow")
    (run,) = [p.parent for p in (out / "mlruns").glob("*/*/params")]
    assert (run / "params" / "run" / "output_dir").read_text() == str(out.resolve())
    last = (run / "metrics" / "final_eval" / "mIoU").read_text().split()
    assert float(last[1]) == pytest.approx(headline(out)[0])
    assert f"logger: MLflow run {run.name}" in proc.stdout


def test_missing_optional_logger_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SmoosegError,
                       match=r"logger=wandb needs the wandb package; pip install 'smooseg\[wandb\]'"):
        build_logger("wandb", tmp_path / "run")
    assert not (tmp_path / "run").exists()
