"""Several runs at once (``train_segmentation.py -m seed=0,1,2,3,4``, Hydra multirun): each job
trains in its own folder, and a Hydra callback summarises the jobs' final evaluations.

With ``smooseg/configs/train.yaml``'s ``hydra.sweep`` the sweep folder is ``output_dir`` and job ``n``
trains in ``<output_dir>/<n>/`` (the job number, so jobs that start within the same second never
share a folder); :class:`SweepSummary` writes ``<output_dir>/summary.json``.
"""

import json
import os
import re
from pathlib import Path

from hydra.experimental.callback import Callback

FINAL_METRICS = "final_eval/metrics.json"  # where train() writes a run's final evaluation


def job_output_dir(cfg):
    """In a multirun, set ``cfg.output_dir`` to the job's own folder (Hydra's
    ``hydra.runtime.output_dir``: ``<hydra.sweep.dir>/<hydra.sweep.subdir>``); single runs keep
    theirs. Returns ``cfg``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.output_dir = str(HydraConfig.get().runtime.output_dir)
    return cfg


def resume_if_requeued(cfg, environ=None):
    """A SLURM job started again after preemption or its time limit (``SLURM_RESTART_COUNT`` > 0,
    as after ``scontrol requeue``, which the submitit launcher does) continues from
    ``<output_dir>/checkpoints/last.ckpt`` when it was started without ``ckpt_path`` and that file
    exists; otherwise ``cfg`` is left as it is. Returns ``cfg``."""
    environ = os.environ if environ is None else environ
    last = Path(str(cfg.output_dir)) / "checkpoints" / "last.ckpt"
    if int(environ.get("SLURM_RESTART_COUNT") or 0) > 0 and cfg.ckpt_path is None and last.is_file():
        print(f"requeued SLURM job (restart {environ['SLURM_RESTART_COUNT']}): continuing from {last}")
        cfg.ckpt_path = "last"
    return cfg


def final_metrics(sweep_dir):
    """``{metrics.json path: modification time}`` of the final evaluations under ``sweep_dir``."""
    return {path: path.stat().st_mtime_ns for path in Path(sweep_dir).glob(f"**/{FINAL_METRICS}")}


def _natural(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def job_headline(path, sweep_dir):
    """The summary entry of the job whose final evaluation is ``path``: its folder, seed (from its
    ``config.yaml``), checkpoint, metrics file, CRF or not, mIoU, Accuracy and provenance."""
    from omegaconf import OmegaConf

    job = Path(path).parents[1]
    metrics = json.loads(Path(path).read_text())
    config = job / "config.yaml"
    seed = OmegaConf.load(config).get("seed") if config.is_file() else None
    return {"job": job.relative_to(sweep_dir).as_posix(), "seed": seed, "output_dir": str(job),
            "checkpoint": metrics.get("checkpoint"), "metrics": str(path), "crf": metrics.get("crf"),
            "mIoU": metrics.get("mIoU"), "Accuracy": metrics.get("Accuracy"), "provenance": metrics.get("provenance")}


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``smooseg/configs/train.yaml``): when a multirun ends, print
    each job's final-evaluation headline and the mean ± sample standard deviation (ddof=1), min
    and max of mIoU and Accuracy over the jobs, and write them to ``<hydra.sweep.dir>/summary.json``.

    It reads the jobs' ``final_eval/metrics.json`` files written during this multirun (files
    left in the folder by an earlier sweep are not counted), so it works with any launcher whose
    jobs write to a shared file system.
    """

    def __init__(self):
        self._before = {}

    def on_multirun_start(self, config, **kwargs):
        self._before = final_metrics(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config, **kwargs):
        from smooseg.eval.results import write_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        fresh = sorted((path for path, stamp in final_metrics(sweep_dir).items()
                        if self._before.get(path) != stamp), key=_natural)
        if not fresh:
            print(f"no final evaluation was written under {sweep_dir} (final_eval.enabled=false, or no "
                  "labelled validation images): no summary over the jobs")
            return
        write_summary([job_headline(path, sweep_dir) for path in fresh], sweep_dir / "summary.json",
                      label="job")
