"""From a composed training config to a trained model: ``train(cfg)`` is what
``train_segmentation.py`` runs; ``build_net`` / ``build_module`` / ``build_trainer`` build one
piece each (the demo and the tests reuse them). The config layout is ``smooseg/configs/train.yaml``.
A run ends, as the reference's does, with the final evaluation of its best checkpoint
(``final_evaluation``, through :func:`smooseg.eval.evaluate.evaluate_jobs`).
"""

import dataclasses
import fcntl
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from smooseg import settings
from smooseg.data.datasets import DatasetInfo, n_classes_of
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import checkpoint_jobs, evaluate_jobs
from smooseg.io import atomic_write, check_output_dir
from smooseg.logs import quiet_known_noise
from smooseg.model.checkpoints import (check_state_dict, is_reference_layout, read_checkpoint,
                                       upgrade_checkpoint)
from smooseg.model.losses import LossConfig
from smooseg.model.net import NetConfig, SmooSegNet
from smooseg.runtime import check_accelerator, resolve_precision
from smooseg.settings import check_settings
from smooseg.signals import TERMINATED_STATUS, Terminated, sigterm_raises
from smooseg.train.callbacks import (SaveOnSigterm, best_checkpoint_callback, build_callbacks,
                                     last_good_checkpoint)
from smooseg.train.datamodule import build_datamodule
from smooseg.train.module import NonFiniteLossError, OptimConfig, SmooSegModule

RUNTIME_MODEL_KEYS = ("pretrained", "weights_path", "weights_url", "fused_attn")


def dataset_info(cfg):
    """The :class:`DatasetInfo` of the configured data set (classes, how it is read and evaluated)."""
    dataset = cfg.dataset
    return DatasetInfo(n_classes_of(dataset.name, dataset.get("n_classes")), name=dataset.name,
                       dir_name=dataset.get("dir_name"), eval_res=int(cfg.eval_res),
                       image_interp=dataset.image_interp)


def build_net(cfg, n_classes):
    """A fresh :class:`SmooSegNet` from the ``model`` keys: identity in :class:`NetConfig`, the
    rest (weights to start from, fused attention, backbone precision) as how it runs."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    config = NetConfig.from_dict(dict(
        model, n_clusters=n_classes + int(cfg.extra_clusters),
        linear_probe_classes=n_classes if cfg.get("linear_probe", False) else None))
    runtime = {k: model[k] for k in RUNTIME_MODEL_KEYS if k in model}
    return SmooSegNet(config, backbone_precision=backbone_precision(cfg), **runtime)


def build_module(cfg):
    """A fresh :class:`SmooSegModule` around :func:`build_net`, from the ``loss``, ``optim`` and
    diagnostics keys."""
    data = dataset_info(cfg)
    diagnostics = diagnostic_options(cfg)
    return SmooSegModule(
        build_net(cfg, data.n_classes), data,
        loss=config_section(LossConfig, cfg, "loss"), optim=config_section(OptimConfig, cfg, "optim"),
        mask_extra_clusters=bool(cfg.mask_extra_clusters), n_log_images=int(cfg.n_log_images),
        hist_freq=diagnostics["hist_freq"], compile=bool((cfg.get("perf") or {}).get("compile", False)))


def config_section(cls, cfg, name):
    """The dataclass ``cls`` from the config section ``name``; a key it does not know (added with
    ``+name.key=...``) is a one-line error naming it."""
    values = OmegaConf.to_container(cfg[name], resolve=True)
    fields = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise SmoosegError(f"{name}.{unknown[0]} is not one of the {name} settings ({', '.join(fields)}); "
                           "remove it")
    return cls(**values)


def diagnostic_options(cfg):
    """Module settings of the diagnostics: ``linear_probe`` (supervised) and ``hist_freq``."""
    hist_freq = int(cfg.get("hist_freq") or 0)
    if hist_freq < 0:
        raise SmoosegError(f"hist_freq={hist_freq} is negative; use 0 (off) or N > 0 (histograms "
                           "every N steps)")
    return {"linear_probe": bool(cfg.get("linear_probe", False)), "hist_freq": hist_freq}


def backbone_precision(cfg):
    """``perf.backbone_precision``; ``auto`` follows a mixed trainer precision (``16-mixed`` runs the
    frozen backbone in fp16 too, as the reference's ``precision=16`` does), else stays ``auto``."""
    value = str((cfg.get("perf") or {}).get("backbone_precision", "auto"))
    if value != "auto":
        return value
    trainer = resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))
    return {"16-mixed": "16", "bf16-mixed": "bf16"}.get(trainer, "auto")


def build_logger(cfg):
    """TensorBoard under ``<output_dir>/tensorboard`` or no logger (``logger=none``)."""
    kind = cfg.logger.type
    if kind == "none":
        return False
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=cfg.output_dir, name="tensorboard", version="",
                                 default_hp_metric=False)
    raise SmoosegError(f"logger.type={kind} is unknown; use logger=tensorboard or logger=none")


def build_trainer(cfg, callbacks=(), labelled_val=True):
    """A Lightning Trainer: ``trainer.*`` keys are passed through (``precision: auto`` resolved);
    without ``labelled_val`` no best checkpoint is chosen (there is no validation mIoU)."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options["precision"] = resolve_precision(options.get("precision", "auto"),
                                             options.get("accelerator", "auto"))
    accumulate = int(options.get("accumulate_grad_batches", 1))
    quiet_known_noise()
    try:
        return pl.Trainer(
            max_steps=int(cfg.max_steps), max_epochs=-1,
            val_check_interval=int(cfg.val_check_interval) * accumulate,
            check_val_every_n_epoch=None, logger=build_logger(cfg),
            callbacks=build_callbacks(cfg.output_dir, best=labelled_val,
                                      progress=options.get("enable_progress_bar", True)) + list(callbacks),
            default_root_dir=cfg.output_dir,
            **options)
    except TypeError as err:
        raise SmoosegError(f"a trainer.* setting is not a Lightning Trainer argument ({err}); "
                           "fix or remove it") from None


def resume_path(cfg, module=None):
    """The checkpoint to resume from: None, ``last`` (``<output_dir>/checkpoints/last.ckpt``) or a path.

    With ``module`` the file is first read safely (weights-only) and checked to be a training
    checkpoint that fits the configured model, so bad files fail with one clear line.
    """
    if cfg.ckpt_path is None:
        return None
    path = Path(cfg.output_dir) / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(
        cfg.ckpt_path)
    if not path.is_file():
        raise SmoosegError(f"ckpt_path={cfg.ckpt_path}: {path} not found; pass an existing checkpoint "
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


def claim_output_dir(cfg):
    """Make ``output_dir`` this run's own before anything is written to it, and return the open
    lock (close it when the run ends; :func:`release_output_dir`).

    A folder holding a run (:func:`run_marks`) is refused unless this run resumes (``ckpt_path``
    set), and ``<output_dir>/.lock`` is held (``flock``) for the run's life, so a second training
    into the same folder stops at once. The kernel drops the lock when its process dies, however
    it dies, so a killed run never blocks its folder. Call it on rank zero only.
    """
    folder = Path(cfg.output_dir)

    def check_no_run():
        marks = run_marks(folder) if cfg.ckpt_path is None else []
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


def save_config(cfg):
    """Write the resolved config to ``<output_dir>/config.yaml``."""
    path = Path(cfg.output_dir) / "config.yaml"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def final_eval_options(cfg):
    """The ``final_eval`` section of ``smooseg/configs/train.yaml`` as a dict."""
    return OmegaConf.to_container(cfg.final_eval, resolve=True)


def check_final_eval(cfg, net):
    """Before training: the final evaluation's ``eval_res`` crops must fit the backbone's patch grid
    (or ``model.fit`` adapt them), so a long run does not fail at its very end."""
    patch, fit = net.backbone.patch_size, net.backbone.fit
    res = int(cfg.eval_res)
    if final_eval_options(cfg)["enabled"] and fit == "error" and res % patch:
        raise SmoosegError(f"eval_res={res}: the final evaluation's {res}x{res} crops are not a multiple of "
                           f"the backbone patch size {patch}; use a multiple of {patch}, set model.fit=resize "
                           "or model.fit=pad, or final_eval.enabled=false")


def final_eval_config(cfg, checkpoint, device):
    """The evaluation settings (the keys of ``smooseg/configs/eval.yaml``) of the final evaluation of
    ``checkpoint``: the validation split of the training data set at ``eval_res``, centre crops, the
    ``final_eval`` options, results in ``<output_dir>/final_eval/``."""
    options = final_eval_options(cfg)
    return OmegaConf.create({
        "model_paths": [str(checkpoint)], "data_dir": cfg.data_dir, "dataset": None, "split": "val",
        "eval_res": int(cfg.eval_res), "image_interp": None, "batch_size": int(options["batch_size"]),
        "num_workers": int(cfg.num_workers), "crf": bool(options["crf"]), "crf_backend": options["crf_backend"],
        "crf_workers": options["crf_workers"], "crf_timeout": 120, "flip": bool(options["flip"]),
        "n_images": int(options["n_images"]), "report": False, "output_dir": str(cfg.output_dir),
        "device": str(device), "precision": str(options["precision"])})


def has_labels(dataset):
    """Whether any image of ``dataset`` has a label map (a directory set may have none)."""
    entries = getattr(dataset, "entries", None)
    return entries is None or any(entry[2] is not None for entry in entries)


def final_evaluation(cfg, checkpoint, device, val_set):
    """Evaluate ``checkpoint`` as ``eval_segmentation.py`` would (:func:`final_eval_config`), print
    the per-class table and write ``<output_dir>/final_eval/metrics.json``; returns the headline
    ``{checkpoint, metrics, crf, mIoU, Accuracy}``, or None when skipped (``final_eval.enabled=false``,
    no checkpoint, or no labelled validation image)."""
    if not final_eval_options(cfg)["enabled"]:
        return None
    if checkpoint is None:
        print("final evaluation skipped: training wrote no checkpoint")
        return None
    if not has_labels(val_set):
        print("final evaluation skipped: the validation images have no labels")
        return None
    eval_cfg = final_eval_config(cfg, checkpoint, device)
    print(f"final evaluation: the val split at {eval_cfg.eval_res}x{eval_cfg.eval_res}, flip "
          f"{'on' if eval_cfg.flip else 'off'}, CRF {'on' if eval_cfg.crf else 'off'} (final_eval.*)")
    ((metrics, written),) = evaluate_jobs(eval_cfg, checkpoint_jobs([checkpoint], names=["final_eval"]))
    return {"checkpoint": str(checkpoint), "metrics": str(written), "crf": metrics["crf"],
            "mIoU": metrics["mIoU"], "Accuracy": metrics["Accuracy"]}


def train(cfg, callbacks=()):
    """Seed, build everything, fit and evaluate the best checkpoint (else ``last.ckpt``); returns
    dict(best, last, best_mIoU, output_dir, final_eval), ``final_eval`` being
    :func:`final_evaluation`'s headline (None when skipped, and on every process but rank zero).

    ``callbacks`` are extra Lightning callbacks added to the trainer's own.
    """
    check_settings(cfg, settings.TRAIN)
    check_accelerator(cfg.trainer.get("accelerator", "auto"))
    check_output_dir(cfg.output_dir, "output_dir")
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build_module(cfg)
    check_final_eval(cfg, module.net)
    ckpt_path = resume_path(cfg, module)
    datamodule = build_datamodule(cfg, module.net)
    labelled_val = has_labels(datamodule.val_set)
    preemption = SaveOnSigterm(Path(cfg.output_dir) / "checkpoints")
    trainer = build_trainer(cfg, [preemption, *callbacks], labelled_val=labelled_val)
    lock = claim_output_dir(cfg) if trainer.is_global_zero else None
    try:
        return fit_and_evaluate(cfg, trainer, module, datamodule, ckpt_path, labelled_val, preemption)
    finally:
        release_output_dir(lock)


def fit_and_evaluate(cfg, trainer, module, datamodule, ckpt_path, labelled_val, preemption):
    """The part of :func:`train` that runs with ``output_dir`` claimed."""
    if trainer.is_global_zero:
        save_config(cfg)
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
        "output_dir": str(cfg.output_dir),
        "final_eval": None,
    }
    trainer.strategy.barrier("final_eval")  # every process has finished training
    if trainer.is_global_zero:
        if labelled_val:
            shown = "-" if result["best_mIoU"] is None else f"{result['best_mIoU']:.2f}"
            print(f"best checkpoint: {result['best']} (val mIoU {shown})")
        print(f"last checkpoint: {result['last']}")
        try:
            with sigterm_raises():
                result["final_eval"] = final_evaluation(cfg, result["best"] or result["last"],
                                                        trainer.strategy.root_device, datamodule.val_set)
        except Terminated:
            print(f"stopped by SIGTERM during the final evaluation: training is complete "
                  f"({result['best'] or result['last']}); evaluate it with eval_segmentation.py "
                  f"model_paths=[{result['best'] or result['last']}]", flush=True)
            raise SystemExit(TERMINATED_STATUS) from None
    return result
