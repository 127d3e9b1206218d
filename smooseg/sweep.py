"""Several runs at once (``train_segmentation.py -m seed=0,1,2,3,4``, Hydra multirun): each job
trains in its own folder, and a Hydra callback summarises the jobs' final evaluations.

With ``smooseg/configs/train.yaml``'s ``hydra.sweep`` the sweep folder is ``output_dir`` and job ``n``
trains in ``<output_dir>/<n>/`` (the job number, so jobs that start within the same second never
share a folder); :class:`SweepSummary` writes ``<output_dir>/summary.json``.

Every job's settings are checked before the first job starts (:func:`job_problem`). A sweep
stopped part-way is finished by the same command with ``ckpt_path=auto`` (:func:`continue_run`):
finished jobs are kept, interrupted ones resume from their ``last.ckpt``, missing ones start,
and the summary covers every job of the sweep.
"""

import json
import os
import re
from pathlib import Path

from hydra.experimental.callback import Callback

from smooseg.errors import SmoosegError

FINAL_METRICS = "final_eval/metrics.json"  # where train() writes a run's final evaluation
AUTO = "auto"  # ckpt_path=auto: continue whatever the run folder holds (continue_run)


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


def job_overrides(config):
    """The command-line overrides of each job of the multirun ``config`` (Hydra's, before any
    job), in job order, as the basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_problem(config):
    """Why a job of the multirun ``config`` cannot run, in one line, or None: each job's config is
    composed as Hydra will compose it and checked (:func:`smooseg.settings.train_settings`), so a
    bad value anywhere in the sweep stops it before job 0 has trained."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from smooseg import settings

    for number, overrides in enumerate(job_overrides(config)):
        try:
            cfg = compose(config_name=str(config.hydra.job.config_name), overrides=overrides)
            settings.train_settings(cfg)
        except (SmoosegError, HydraException, OmegaConfBaseException) as err:
            reason = " ".join(str(err).split())
            return (f"job {number} of the sweep ({' '.join(overrides)}): {reason}; nothing was run, fix the "
                    "value and run the command again")
    return None


def saved_step(path):
    """The global step a training checkpoint was saved at (read without copying its tensors)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def continue_run(cfg):
    """``ckpt_path=auto``: what the run folder ``cfg.output_dir`` holds decides. Returns ``cfg`` to
    train (``ckpt_path`` set to ``last`` to resume an interrupted run, or null to start a folder
    that holds no run), or None when the run is finished: ``last.ckpt`` at ``max_steps`` and its
    final evaluation written (or not asked for), so it is kept as it is. A folder holding only
    the ``config.yaml`` of a run that never saved a checkpoint starts afresh; one holding results
    but no ``last.ckpt`` is refused (nothing to resume from, and a new run would mix with them).
    Any other ``ckpt_path`` is left as it is."""
    if cfg.ckpt_path != AUTO:
        return cfg
    from smooseg.train.train import run_marks

    folder = Path(cfg.output_dir)
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        step = saved_step(last)
        evaluated = (folder / FINAL_METRICS).is_file() or not cfg.final_eval.enabled
        if step >= int(cfg.max_steps) and evaluated:
            print(f"{folder}: finished (step {step} of {cfg.max_steps}, final evaluation written); kept")
            return None
        print(f"{folder}: resuming from {last} (step {step} of {cfg.max_steps})")
        cfg.ckpt_path = "last"
        return cfg
    marks = run_marks(folder)
    if marks == ["config.yaml"]:
        print(f"{folder}: no checkpoint was saved before the run stopped; starting it afresh")
        (folder / "config.yaml").unlink(missing_ok=True)  # every DDP process may get here
    elif marks:
        raise SmoosegError(f"ckpt_path=auto: output_dir={folder} holds a run without checkpoints/last.ckpt "
                           f"({', '.join(marks[:3])}): nothing to resume from; "
                           "remove the folder to start afresh")
    cfg.ckpt_path = None
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
            "mIoU": metrics.get("mIoU"), "Accuracy": metrics.get("Accuracy"),
            "provenance": metrics.get("provenance")}


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``smooseg/configs/train.yaml``): when a multirun ends, print
    each job's final-evaluation headline and the mean ± sample standard deviation (ddof=1), min
    and max of mIoU and Accuracy over the jobs, and write them to ``<hydra.sweep.dir>/summary.json``.

    The jobs are those this multirun launched (their folders noted as each starts, kept finished
    jobs of a continued sweep included), so the summary covers the whole sweep and nothing left
    in the folder by another one. With a launcher that runs jobs in other processes (nothing
    noted here) it reads the ``final_eval/metrics.json`` files written during this multirun.
    """

    def __init__(self):
        self._before = {}
        self._jobs = []

    def on_multirun_start(self, config, **kwargs):
        self._before = final_metrics(str(config.hydra.sweep.dir))
        self._jobs = []

    def on_job_start(self, config, **kwargs):
        folder = config.hydra.runtime.get("output_dir") if "runtime" in config.hydra else None
        if folder:
            self._jobs.append(Path(str(folder)))

    def results(self, sweep_dir):
        """The final evaluations the summary covers, in job order."""
        if self._jobs:
            found = [job / FINAL_METRICS for job in self._jobs if (job / FINAL_METRICS).is_file()]
        else:
            found = [path for path, stamp in final_metrics(sweep_dir).items()
                     if self._before.get(path) != stamp]
        return sorted(found, key=_natural)

    def on_multirun_end(self, config, **kwargs):
        from smooseg.eval.results import write_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        found = self.results(sweep_dir)
        if not found:
            print(f"no final evaluation was written under {sweep_dir} (final_eval.enabled=false, or no "
                  "labelled validation images): no summary over the jobs")
            return
        write_summary([job_headline(path, sweep_dir) for path in found], sweep_dir / "summary.json",
                      label="job")
