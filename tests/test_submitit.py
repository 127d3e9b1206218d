"""Hydra's submitit launcher: a 2-job sweep through hydra/launcher=submitit_local ends with the
summary over its jobs (what hydra/launcher=submitit_slurm does on a cluster, one job per seed), and
a requeued SLURM job continues from last.ckpt."""

import importlib.util
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from smooseg.cli import slurm_tasks
from smooseg.commands.launch import CONFIG_DIR
from smooseg.sweep import resume_if_requeued
from tests.conftest import TRAIN_OVERRIDES, run_script

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher not installed (pip install smooseg[slurm])")


@pytest.mark.slow
@needs_submitit
def test_submitit_local_sweep_writes_the_summary(synthetic_data, tmp_path):
    out = tmp_path / "sweep"
    tiny = [o for o in TRAIN_OVERRIDES if not o.startswith(("max_steps", "val_check_interval", "seed"))]
    proc = run_script("train_segmentation.py", "-m", *tiny, "max_steps=4", "val_check_interval=2",
                      "batch_size=4", f"data_dir={synthetic_data}", f"output_dir={out}", "seed=0,1",
                      "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    jobs = {run["job"]: run for run in summary["runs"]}
    assert sorted(jobs) == ["0", "1"] and [jobs[j]["seed"] for j in ("0", "1")] == [0, 1]
    for job in ("0", "1"):
        metrics = json.loads((out / job / "final_eval" / "metrics.json").read_text())
        assert jobs[job]["mIoU"] == pytest.approx(metrics["mIoU"])
    assert list((out / ".submitit").iterdir()), "submitit keeps each job's logs under .submitit/"
    assert "summary over 2 jobs" in proc.stdout


def test_requeued_slurm_job_resumes_from_last(tmp_path, capsys):
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "ckpt_path": None})
    assert resume_if_requeued(cfg, {"SLURM_RESTART_COUNT": "1"}).ckpt_path is None  # nothing saved yet
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_if_requeued(cfg, {}).ckpt_path is None  # a first start
    assert resume_if_requeued(cfg, {"SLURM_RESTART_COUNT": "0"}).ckpt_path is None
    assert resume_if_requeued(cfg, {"SLURM_RESTART_COUNT": "2"}).ckpt_path == "last"
    assert "requeued SLURM job (restart 2): continuing from" in capsys.readouterr().out
    chosen = OmegaConf.create({"output_dir": str(tmp_path), "ckpt_path": "other.ckpt"})
    assert resume_if_requeued(chosen, {"SLURM_RESTART_COUNT": "1"}).ckpt_path == "other.ckpt"


@needs_submitit
def test_slurm_launcher_presets_compose_with_the_documented_keys():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=1440"])
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.timeout_min == 1440
    assert slurm_tasks(cfg)
    cfg.hydra.launcher.tasks_per_node = 1
    assert not slurm_tasks(cfg)
