"""From checked training settings to a trained model: ``train(settings)`` is what
``train_segmentation.py`` runs; ``build_net`` / ``build_module`` / ``build_trainer`` build one
piece each (the demo and the tests reuse them). The settings are
:class:`smooseg.settings.TrainSettings`, every ``auto`` already resolved.
A run ends, as the reference's does, with the final evaluation of its best checkpoint
(``final_evaluation``, through :func:`smooseg.eval.evaluate.evaluate_jobs`).
"""

import dataclasses
import fcntl
import logging
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.utilities.exceptions import SIGTERMException

from smooseg.data.datasets import DatasetInfo, n_classes_of
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import checkpoint_jobs, evaluate_jobs
from smooseg.io import atomic_write, check_output_dir
from smooseg.model.checkpoints import (
    check_state_dict,
    is_reference_layout,
    read_checkpoint,
    upgrade_checkpoint,
)
from smooseg.model.net import NetConfig, SmooSegNet
from smooseg.settings import HOW_IT_RUNS, RUN_DEFINING, EvalSettings, to_yaml
from smooseg.signals import TERMINATED_STATUS, Terminated, sigterm_raises
from smooseg.train import loggers
from smooseg.train.callbacks import (
    SaveOnSigterm,
    best_checkpoint_callback,
    build_callbacks,
    last_good_checkpoint,
)
from smooseg.train.datamodule import build_datamodule
from smooseg.train.module import NonFiniteLossError, OptimConfig, SmooSegModule

RUNTIME_MODEL_KEYS = ("pretrained", "weights_path", "weights_url", "weights_source", "fused_attn")


def dataset_info(settings):
    """The :class:`DatasetInfo` of the configured data set (classes, how it is read and evaluated)."""
    dataset = settings.dataset
    n_classes = n_classes_of(dataset.name, dataset.n_classes, n_clusters=dataset.n_clusters)
    return DatasetInfo(n_classes, name=dataset.name, dir_name=dataset.dir_name,
                       eval_res=settings.eval_res, image_interp=dataset.image_interp)


def build_net(settings, n_classes):
    """A fresh :class:`SmooSegNet` from ``settings.model``: identity in :class:`NetConfig`, the
    rest (weights to start from, fused attention, the resolved backbone precision) as how it runs."""
    model = dataclasses.asdict(settings.model)
    config = NetConfig.from_dict(dict(
        model, n_clusters=n_classes + settings.extra_clusters,
        linear_probe_classes=n_classes if settings.linear_probe else None))
    runtime = {k: model[k] for k in RUNTIME_MODEL_KEYS}
    return SmooSegNet(config, backbone_precision=settings.perf.backbone_precision, **runtime)


def build_module(settings):
    """A fresh :class:`SmooSegModule` around :func:`build_net`, from the ``loss``, ``optim`` and
    diagnostics settings."""
    data = dataset_info(settings)
    return SmooSegModule(
        build_net(settings, data.n_classes), data,
        loss=settings.loss,
        optim=OptimConfig(**dataclasses.asdict(settings.optim)),
        mask_extra_clusters=settings.mask_extra_clusters, n_log_images=settings.n_log_images,
        hist_freq=settings.hist_freq, compile=settings.perf.compile)


def build_logger(settings):
    """The ``logger`` section's logger (:func:`smooseg.train.loggers.build_logger`)."""
    section = settings.logger
    return loggers.build_logger(section.type, settings.output_dir, project=section.project,
                                entity=section.entity, name=section.name, tags=list(section.tags),
                                tracking_uri=section.tracking_uri)


def build_trainer(settings, callbacks=(), labelled_val=True):
    """A Lightning Trainer from ``settings.trainer`` (its ``extra`` arguments passed as they are);
    without ``labelled_val`` no best checkpoint is chosen (there is no validation mIoU)."""
    trainer = settings.trainer
    options = {k: v for k, v in dataclasses.asdict(trainer).items() if k != "extra"}
    try:
        return pl.Trainer(
            max_steps=settings.max_steps, max_epochs=-1,
            val_check_interval=settings.val_check_interval * trainer.accumulate_grad_batches,
            check_val_every_n_epoch=None, logger=build_logger(settings),
            callbacks=build_callbacks(settings.output_dir, best=labelled_val,
                                      progress=trainer.enable_progress_bar) + list(callbacks),
            default_root_dir=settings.output_dir, **options, **trainer.extra)
    except TypeError as err:
        raise SmoosegError(f"a trainer.* setting is not a Lightning Trainer argument ({err}); "
                           "fix or remove it") from None


def resume_path(settings, module=None):
    """The checkpoint to resume from: None, ``last`` (``<output_dir>/checkpoints/last.ckpt``) or a path.

    With ``module`` the file is first read safely (weights-only) and checked to be a training
    checkpoint that fits the configured model, so bad files fail with one clear line.
    """
    if settings.ckpt_path is None:
        return None
    path = Path(settings.output_dir) / "checkpoints" / "last.ckpt" if settings.ckpt_path == "last" else Path(
        settings.ckpt_path)
    if not path.is_file():
        raise SmoosegError(f"ckpt_path={settings.ckpt_path}: {path} not found; pass an existing checkpoint "
                           "or ckpt_path=null to start afresh")
    if module is not None:
        ckpt = read_checkpoint(path)
        if not is_reference_layout(ckpt["state_dict"]):
            check_state_dict(module.state_dict(), upgrade_checkpoint(ckpt)["state_dict"], path,
                             module.net.config.describe() + " configured for this run")
        if is_reference_layout(ckpt["state_dict"]) or "optimizer_states" not in ckpt:
            raise SmoosegError(f"ckpt_path={path} holds no training state (optimiser, loops); resume "
                               "from a last.ckpt written by train_segmentation.py")
    return str(path)


def run_marks(folder):
    """What in ``folder`` shows that a training run wrote there (relative paths, empty when none):
    ``config.yaml`` (written first), any checkpoint under ``checkpoints/`` and ``final_eval/``.
    A run whose ``last.ckpt`` was deleted is still a run: its config, best checkpoints and
    results would be mixed with another's."""
    folder = Path(folder)
    found = [folder / "config.yaml", *sorted((folder / "checkpoints").glob("*.ckpt")), folder / "final_eval"]
    return [path.relative_to(folder).as_posix() for path in found if path.exists()]


def claim_output_dir(settings):
    """Make ``output_dir`` this run's own before anything is written to it, and return the open
    lock (close it when the run ends; :func:`release_output_dir`).

    A folder holding a run (:func:`run_marks`) is refused unless this run resumes (``ckpt_path``
    set), and ``<output_dir>/.lock`` is held (``flock``) for the run's life, so a second training
    into the same folder stops at once. The kernel drops the lock when its process dies, however
    it dies, so a killed run never blocks its folder. Call it on rank zero only.
    """
    folder = Path(settings.output_dir)

    def check_no_run():
        marks = run_marks(folder) if settings.ckpt_path is None else []
        if marks:
            resume = ("resume it with ckpt_path=last, " if (folder / "checkpoints" / "last.ckpt").is_file()
                      else "")
            raise SmoosegError(f"output_dir={folder} already holds a run ({', '.join(marks[:3])}); "
                               f"{resume}choose another output_dir, or remove the folder to start afresh")

    lock = folder / ".lock"

    def take_lock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SmoosegError(f"output_dir={folder} is being written by a running training (process "
                               f"{owner}, {lock}); choose another output_dir, or when it has ended resume it "
                               "with ckpt_path=last") from None

    if lock.is_file():  # a running training is named as such, before what its folder holds
        probe = os.open(lock, os.O_RDWR)
        take_lock(probe)
        os.close(probe)  # free again: taken for good below, once the folder is known to be free
    check_no_run()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    take_lock(fd)
    try:
        check_no_run()  # a run that held the lock until just now may have written its files
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_output_dir(lock):
    """Let go of the lock :func:`claim_output_dir` returned (None: nothing to release)."""
    if lock is not None:
        os.close(lock)  # closing the descriptor drops the flock


def print_data_sizes(datamodule):
    """One line: how many images training and validation use."""
    print(f"data: {len(datamodule.train_set)} training images, {len(datamodule.val_set)} validation images")


def config_files(output_dir):
    """The settings files of the run in ``output_dir``, one per segment, oldest first:
    ``config.yaml``, then ``config.resume-<n>.yaml`` for the n-th resume."""
    folder = Path(output_dir)
    resumes = sorted(folder.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [p for p in [folder / "config.yaml"] if p.is_file()] + resumes


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_settings(before, after):
    """``{key: (before, after)}`` of the settings in RUN_DEFINING that differ; ``before`` and
    ``after`` are TrainSettings or the plain dicts of a run's settings file."""
    def flat(settings):
        tree = settings if isinstance(settings, dict) else yaml.safe_load(to_yaml(settings))
        return dict(_flat(tree))

    def defines_the_run(key):
        run_key = key in RUN_DEFINING or key.startswith(tuple(f"{k}." for k in RUN_DEFINING))
        return run_key and not key.startswith(HOW_IT_RUNS)

    old, new = flat(before), flat(after)
    return {key: (old.get(key), value) for key, value in sorted(new.items())
            if defines_the_run(key) and old.get(key) != value}


def check_resume_changes(settings, ckpt_path):
    """Resuming: refuse settings that alter the run against its last segment's settings file,
    naming each changed key, unless ``resume_changes`` (then they apply from the checkpoint's step)."""
    if ckpt_path is None:
        return
    files = config_files(Path(ckpt_path).parents[1])
    if not files:
        return
    changes = changed_settings(yaml.safe_load(files[-1].read_text()), settings)
    if changes and not settings.resume_changes:
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
        raise SmoosegError(f"ckpt_path={settings.ckpt_path}: these settings differ from the run's "
                           f"({files[-1]}) and would alter it: {listed}; resume with the run's settings, "
                           "start a new output_dir, or pass resume_changes=true to apply them from here on")


def save_config(settings):
    """Write the resolved settings to ``<output_dir>/config.yaml``; a resumed run adds its
    segment's settings as ``config.resume-<n>.yaml`` (earlier segments' files are kept)."""
    path = Path(settings.output_dir) / "config.yaml"
    if settings.ckpt_path is not None and path.is_file():
        path = path.with_name(f"config.resume-{len(config_files(settings.output_dir))}.yaml")
    with atomic_write(path) as tmp:
        Path(tmp).write_text(to_yaml(settings))
    return path


def open_run_log(output_dir, name="train_segmentation.log"):
    """Also write this process's log records to ``<output_dir>/<name>`` (once the run has claimed
    its folder, so a run that cannot start leaves no log file); returns the handler."""
    root = logging.getLogger()
    handler = logging.FileHandler(Path(output_dir) / name)
    handler.setFormatter(logging.Formatter("%(message)s"))  # as on the console: one log format
    root.addHandler(handler)
    return handler


def close_run_log(handler):
    """Stop writing to the log file :func:`open_run_log` opened (None: nothing to close)."""
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def check_patch_grid(settings, net):
    """Before training: the training and validation crops (``res``, ``val_res``) and the final
    evaluation's (``eval_res``) must fit the backbone's patch grid, or ``model.fit`` adapt them, so
    a run does not fail once its folder is written, nor a long one at its very end."""
    patch = net.backbone.patch_size
    if net.backbone.fit != "error":
        return
    fix = f"use a multiple of {patch}, or set model.fit=resize or model.fit=pad"
    crops = [("val_res", settings.val_res, "validation's")]
    if settings.dataset.train_crop != "none":
        crops.insert(0, ("res", settings.res, "training"))
    for key, res, what in crops:
        if res % patch:
            raise SmoosegError(f"{key}={res}: the {what} {res}x{res} crops are not a multiple of the "
                               f"backbone patch size {patch}; {fix}")
    res = settings.eval_res
    if settings.final_eval.enabled and res % patch:
        raise SmoosegError(f"eval_res={res}: the final evaluation's {res}x{res} crops are not a multiple of "
                           f"the backbone patch size {patch}; {fix}, or final_eval.enabled=false")


def final_eval_settings(settings, checkpoint, device):
    """The :class:`EvalSettings` of the final evaluation of ``checkpoint``: the validation split of
    the training data set at ``eval_res``, centre crops, the (resolved) ``final_eval`` settings,
    results in ``<output_dir>/final_eval/``."""
    final = settings.final_eval
    return EvalSettings(
        model_paths=[str(checkpoint)], data_dir=settings.data_dir, dataset=None, split="val",
        eval_res=settings.eval_res, image_interp=None, batch_size=final.batch_size,
        num_workers=settings.num_workers, crf=final.crf, crf_backend=final.crf_backend,
        crf_workers=final.crf_workers, crf_timeout=final.crf_timeout, flip=final.flip,
        n_images=final.n_images, report=False, output_dir=str(settings.output_dir), device=str(device),
        precision=final.precision)


def final_evaluation(settings, checkpoint, device, val_set):
    """Evaluate ``checkpoint`` as ``eval_segmentation.py`` would (:func:`final_eval_settings`), print
    the per-class table and write ``<output_dir>/final_eval/metrics.json``; returns the headline
    ``{checkpoint, metrics, crf, mIoU, Accuracy}``, or None when skipped (``final_eval.enabled=false``,
    no checkpoint, or no labelled validation image)."""
    if not settings.final_eval.enabled:
        return None
    if checkpoint is None:
        print("final evaluation skipped: training wrote no checkpoint")
        return None
    if not val_set.labelled:
        print("final evaluation skipped: the validation images have no labels")
        return None
    evaluation = final_eval_settings(settings, checkpoint, device)
    print(f"final evaluation: the val split at {evaluation.eval_res}x{evaluation.eval_res}, flip "
          f"{'on' if evaluation.flip else 'off'}, CRF {'on' if evaluation.crf else 'off'} (final_eval.*)")
    ((metrics, written),) = evaluate_jobs(evaluation, checkpoint_jobs([checkpoint], names=["final_eval"]))
    return {"checkpoint": str(checkpoint), "metrics": str(written), "crf": metrics["crf"],
            "mIoU": metrics["mIoU"], "Accuracy": metrics["Accuracy"]}


def train(settings, callbacks=()):
    """Seed, build everything, fit and evaluate the best checkpoint (else ``last.ckpt``); returns
    dict(best, last, best_mIoU, output_dir, final_eval), ``final_eval`` being
    :func:`final_evaluation`'s headline (None when skipped, and on every process but rank zero).

    ``settings`` are checked and resolved :class:`smooseg.settings.TrainSettings`
    (:func:`smooseg.settings.train_settings`); ``callbacks`` are extra Lightning callbacks.
    """
    check_output_dir(settings.output_dir, "output_dir")
    pl.seed_everything(settings.seed, workers=True)
    module = build_module(settings)
    check_patch_grid(settings, module.net)
    ckpt_path = resume_path(settings, module)
    check_resume_changes(settings, ckpt_path)
    datamodule = build_datamodule(settings, module.net)
    labelled_val = datamodule.val_set.labelled
    module.val_labelled = labelled_val
    preemption = SaveOnSigterm(Path(settings.output_dir) / "checkpoints")
    trainer = build_trainer(settings, [preemption, *callbacks], labelled_val=labelled_val)
    lock = claim_output_dir(settings) if trainer.is_global_zero else None
    log = open_run_log(settings.output_dir) if trainer.is_global_zero else None
    try:
        return fit_and_evaluate(settings, trainer, module, datamodule, ckpt_path, labelled_val, preemption)
    finally:
        close_run_log(log)
        release_output_dir(lock)


def fit_and_evaluate(settings, trainer, module, datamodule, ckpt_path, labelled_val, preemption):
    """The part of :func:`train` that runs with ``output_dir`` claimed."""
    if trainer.is_global_zero:
        save_config(settings)
        loggers.log_run(trainer.logger, settings.output_dir, dataclasses.asdict(settings))
        print_data_sizes(datamodule)
        if not labelled_val:
            print("no best checkpoint: the validation images have no labels, so there is no validation "
                  "mIoU to choose one by; last.ckpt is kept")
    try:
        with warnings.catch_warnings():
            # EpochSampler does resume mid-epoch (Lightning cannot tell from the loader)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError as err:
        raise SmoosegError(f"non-finite training loss (NaN or inf) at step {err.step}; last good "
                           f"checkpoint: {last_good_checkpoint(trainer) or 'none yet'}; lower the "
                           "learning rates (optim.lr1 / optim.lr2) or check the data") from None
    except SIGTERMException:
        if trainer.is_global_zero:
            if preemption.saved is not None:
                print(f"stopped by SIGTERM at step {preemption.step}: saved {preemption.saved}; "
                      "continue with ckpt_path=last", flush=True)
            else:
                print("stopped by SIGTERM before training began: nothing saved", flush=True)
        raise SystemExit(TERMINATED_STATUS) from None
    except SystemExit as stop:  # Lightning answers Ctrl-C (the whole process group) with exit(1)
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None  # the entry point's one line and status 130
        raise
    callback = best_checkpoint_callback(trainer)
    score = None if callback is None else callback.best_model_score
    result = {
        "best": (callback.best_model_path or None) if callback is not None else None,
        "last": last_good_checkpoint(trainer),
        "best_mIoU": None if score is None else float(score),
        "output_dir": str(settings.output_dir),
        "final_eval": None,
    }
    trainer.strategy.barrier("final_eval")  # every process has finished training
    if trainer.is_global_zero:
        if labelled_val and result["best"] is None:
            print("no best checkpoint: no validation scored a labelled pixel; last.ckpt is kept")
        elif labelled_val:
            print(f"best checkpoint: {result['best']} (val mIoU {result['best_mIoU']:.2f})")
        print(f"last checkpoint: {result['last']}")
        try:
            with sigterm_raises():
                result["final_eval"] = final_evaluation(settings, result["best"] or result["last"],
                                                        trainer.strategy.root_device, datamodule.val_set)
        except Terminated:
            print(f"stopped by SIGTERM during the final evaluation: training is complete "
                  f"({result['best'] or result['last']}); evaluate it with eval_segmentation.py "
                  f"model_paths=[{result['best'] or result['last']}]", flush=True)
            raise SystemExit(TERMINATED_STATUS) from None
        loggers.log_final_eval(trainer.logger, result["final_eval"], trainer.global_step)
    return result
