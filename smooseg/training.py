"""From a composed training config to a trained model: data, module, trainer, fit.

``train(cfg)`` is what ``train_segmentation.py`` runs; the other functions build one piece each
and are reused by the demo and the tests. The config layout is ``configs/train.yaml``.
"""

import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from smooseg.checkpoints import check_state_dict, describe_model, is_reference_layout, read_checkpoint
from smooseg.data.datasets import (N_CLASSES, CroppedDataset, build_dataset, class_names, crop_dir_name,
                                   dataset_key)
from smooseg.errors import SmoosegError, atomic_write
from smooseg.feature_cache import check_deterministic, open_or_build
from smooseg.module import NonFiniteLossError, SmooSegModule

# No "=" in the name: Hydra list overrides (model_paths=[...]) could not take it unquoted.
BEST_FILENAME = "best-step{step}-mIoU{val/cluster/mIoU:.2f}"


def n_classes_of(dataset_cfg):
    """Number of classes of the configured data set (``dataset.n_classes`` for directory sets)."""
    if dataset_cfg.name == "directory":
        if dataset_cfg.get("n_classes") is None:
            raise SmoosegError("dataset.n_classes is not set; a directory data set needs the number "
                               "of classes, e.g. dataset.n_classes=5")
        return int(dataset_cfg.n_classes)
    if dataset_cfg.name not in N_CLASSES:
        raise SmoosegError(f"dataset.name={dataset_cfg.name} is unknown; use cityscapes, "
                           "cocostuff27, potsdam or directory")
    return N_CLASSES[dataset_cfg.name]


def build_module(cfg):
    """A fresh :class:`SmooSegModule` from the ``model``, ``loss``, ``optim`` and ``dataset`` keys."""
    n_classes = n_classes_of(cfg.dataset)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return SmooSegModule(
        n_classes=n_classes,
        dataset_name=cfg.dataset.name,
        class_names=class_names(cfg.dataset.name, n_classes),
        extra_clusters=int(cfg.extra_clusters),
        mask_extra_clusters=bool(cfg.mask_extra_clusters),
        n_log_images=int(cfg.n_log_images),
        eval_res=int(cfg.eval_res),
        image_interp=cfg.dataset.image_interp,
        dir_name=cfg.dataset.get("dir_name"),
        **model,
        **OmegaConf.to_container(cfg.loss, resolve=True),
        **OmegaConf.to_container(cfg.optim, resolve=True),
        **perf_options(cfg),
        **diagnostic_options(cfg),
    )


def diagnostic_options(cfg):
    """Module settings of the diagnostics: ``linear_probe`` (supervised) and ``hist_freq``."""
    hist_freq = int(cfg.get("hist_freq") or 0)
    if hist_freq < 0:
        raise SmoosegError(f"hist_freq={hist_freq} is negative; use 0 (off) or N > 0 (histograms "
                           "every N steps)")
    return {"linear_probe": bool(cfg.get("linear_probe", False)), "hist_freq": hist_freq}


def check_probe_labels(cfg, train_set):
    """With ``linear_probe`` every training image needs a label (the probe is supervised)."""
    if not cfg.get("linear_probe", False):
        return
    unlabelled = [entry[0] for entry in getattr(train_set, "entries", ()) if entry[2] is None]
    if unlabelled:
        raise SmoosegError(f"linear_probe=true needs labelled training images but {len(unlabelled)} "
                           f"have no label (e.g. {unlabelled[0]}); add labels or set linear_probe=false")


def backbone_precision(cfg):
    """``perf.backbone_precision``; ``auto`` follows a mixed trainer precision (``16-mixed`` runs the
    frozen backbone in fp16 too, as the reference's ``precision=16`` does), else stays ``auto``."""
    value = str((cfg.get("perf") or {}).get("backbone_precision", "auto"))
    if value != "auto":
        return value
    trainer = resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))
    return {"16-mixed": "16", "bf16-mixed": "bf16"}.get(trainer, "auto")


def perf_options(cfg):
    """Module speed settings from the ``perf`` section (backbone precision, compiled heads + loss)."""
    perf = cfg.get("perf") or {}
    return {"backbone_precision": backbone_precision(cfg), "compile": bool(perf.get("compile", False))}


def crop_command(cfg, source):
    """The ``crop_datasets.py`` command that writes the cropped training set ``source`` of ``cfg``."""
    words = ["python crop_datasets.py", f"data_dir={cfg.data_dir}", f"datasets=[{cfg.dataset.name}]",
             f"crop_types=[{source['crop_type']}]", f"crop_ratio={source['ratio']}"]
    if cfg.dataset.name == "directory":
        words += [f"dir_dataset_name={cfg.dataset.get('dir_name')}",
                  f"dir_dataset_n_classes={cfg.dataset.get('n_classes')}"]
    return " ".join(words)


def train_crop_source(cfg):
    """The pre-cropped training set to read, or None when ``dataset.train_crop_source`` is null.

    The published Cityscapes / COCO-Stuff runs train on the five-crop sets; a missing set stops
    training with the command that writes it, rather than training on other data.
    """
    source = cfg.dataset.get("train_crop_source")
    if source is None:
        return None
    source = OmegaConf.to_container(source, resolve=True)
    folder = Path(cfg.data_dir) / "cropped" / crop_dir_name(
        dataset_key(cfg.dataset.name, cfg.dataset.get("dir_name")), source["crop_type"], source["ratio"])
    if not folder.is_dir():
        raise SmoosegError(f"the cropped training set {folder} does not exist; write it with "
                           f"`{crop_command(cfg, source)}`, or train on the raw images with "
                           "dataset.train_crop_source=null")
    return source


def train_split(cfg):
    """The training split: Potsdam adds its unlabelled tiles only with ``dataset.train_unlabelled``."""
    if cfg.dataset.get("train_unlabelled", False):
        if cfg.dataset.name != "potsdam":
            raise SmoosegError(f"dataset.train_unlabelled=true is for potsdam only, not {cfg.dataset.name}; "
                               "remove it")
        return "train+unlabelled"
    return "train"


def build_datasets(cfg):
    """(train set, validation set); validation uses centre crops at ``val_res`` (the training
    resolution unless set, as the reference validates)."""
    common = dict(name=cfg.dataset.name, data_dir=cfg.data_dir, image_interp=cfg.dataset.image_interp,
                  n_classes=cfg.dataset.get("n_classes"), dir_name=cfg.dataset.get("dir_name"),
                  seed=int(cfg.seed))
    train_set = build_dataset(split=train_split(cfg), res=int(cfg.res), crop=cfg.dataset.train_crop,
                              crop_source=train_crop_source(cfg), **common)
    val_set = build_dataset(split="val", res=int(cfg.val_res), crop="center", **common)
    return train_set, val_set


def loader_options(cfg):
    """DataLoader keyword arguments from ``num_workers`` and the ``loader`` section."""
    workers = int(cfg.num_workers)
    loader = cfg.get("loader") or {}
    pin = loader.get("pin_memory", "auto")
    if pin not in (True, False, "auto"):
        raise SmoosegError(f"loader.pin_memory={pin} is not allowed; use auto, true or false")
    if pin == "auto":
        pin = uses_cuda(cfg.trainer.get("accelerator", "auto"))
    options = dict(num_workers=workers, pin_memory=pin)
    if workers > 0:
        options["persistent_workers"] = bool(loader.get("persistent_workers", True))
        if loader.get("prefetch_factor") is not None:
            options["prefetch_factor"] = int(loader.get("prefetch_factor"))
    return options


def cache_enabled(cfg):
    """Whether training reads backbone features from the feature cache (``cache.enabled``)."""
    return bool((cfg.get("cache") or {}).get("enabled", False))


def cached_train_set(cfg, train_set, module):
    """The training set's backbone features from the feature cache, built on first use.

    Refuses random crops (the cache would not match what training sees) before building anything.
    """
    check_deterministic(cfg.dataset.train_crop)
    cache = cfg.cache
    source = train_crop_source(cfg) if isinstance(train_set, CroppedDataset) else None
    device = "cuda" if uses_cuda(cfg.trainer.get("accelerator", "auto")) else "cpu"
    return open_or_build(
        train_set, module.backbone, cache.dir, dataset_key(cfg.dataset.name, cfg.dataset.get("dir_name")),
        "train", int(cfg.res), cfg.dataset.train_crop, cfg.dataset.image_interp, crop_source=source,
        dtype=str(cache.get("dtype", "float16")), batch_size=int(cache.get("batch_size") or cfg.batch_size),
        num_workers=int(cfg.num_workers), device=device, precision=module.hparams.backbone_precision,
        data_dir=cfg.data_dir)


def build_dataloaders(cfg, module=None):
    """(train loader: shuffled, whole batches; validation loader: every image counts).

    With ``cache.enabled`` the train loader yields cached backbone features (``feats``) of the
    same images in the same order; ``module`` (whose backbone fills the cache) is then required.
    """
    train_set, val_set = build_datasets(cfg)
    check_probe_labels(cfg, train_set)
    batch_size = int(cfg.batch_size)
    if len(train_set) < batch_size:
        raise SmoosegError(f"the training set has {len(train_set)} images, fewer than batch_size="
                           f"{batch_size}; lower batch_size")
    if cache_enabled(cfg):
        if module is None:
            raise ValueError("build_dataloaders: cache.enabled needs the module whose backbone fills it")
        train_set = cached_train_set(cfg, train_set, module)
    common = loader_options(cfg)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, **common)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, drop_last=False, **common)
    return train_loader, val_loader


def uses_cuda(accelerator):
    """Whether Lightning will run on a CUDA GPU for this ``trainer.accelerator`` value."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision, accelerator="auto"):
    """``auto``: bf16-mixed on a GPU with bf16 support, 16-mixed on other GPUs, 32-true on CPU."""
    precision = str(precision)
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class ValidateAtMaxSteps(Callback):
    """Ask the loop to stop at ``max_steps``, so the final state is validated and checkpointed too."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


# ---- reliability: last checkpoint, random streams, exact resume, DDP-exact loaders ----

class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, rewritten at every validation.

    (Lightning 2.6's ``save_last`` rewrites it only when a best-k checkpoint is saved at the same
    step, so a run whose mIoU stops improving would resume from an old state.)
    """

    def __init__(self, dirpath):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False)


def random_state():
    """The global random streams (torch CPU and CUDA, numpy, python) as tensors and plain values,
    so a checkpoint holding them still loads with weights-only unpickling."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_random_state(state):
    """Restore what :func:`random_state` returned (CUDA streams for the devices present)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class RandomStateCheckpoint(Callback):
    """Saves the global random streams in checkpoints and restores them when a fit resumes.

    Dropout masks and the inter-image pairing draw from the global torch stream; restoring it at
    ``on_train_start`` makes a resumed run draw what the uninterrupted run would have drawn.
    """

    def __init__(self):
        self._to_restore = None

    def state_dict(self):
        return random_state()

    def load_state_dict(self, state_dict):
        self._to_restore = state_dict

    def on_train_start(self, trainer, pl_module):
        if self._to_restore is not None:
            set_random_state(self._to_restore)
            self._to_restore = None


class EpochSampler(DistributedSampler):
    """Training order: a shuffle seeded by (``seed``, epoch), split over processes like
    DistributedSampler (Lightning keeps it as it is); its first pass may start ``skip`` samples
    into ``epoch``, which is how a resumed fit continues mid-epoch with the batches it would have had.
    For a data set with ``epoch_items`` (random crops) it yields ``(index, epoch)`` pairs, so every
    worker process, persistent or not, crops each epoch afresh and a resume repeats the crops.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, epoch=0, skip=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self._resume = (int(epoch), int(skip))

    def __iter__(self):
        indices = list(super().__iter__())
        epoch, skip = self._resume
        self._resume = (None, 0)
        indices = indices[skip:] if epoch == self.epoch else indices
        if getattr(self.dataset, "epoch_items", False):  # random crops: the epoch rides along
            return iter([(index, self.epoch) for index in indices])
        return iter(indices)


def resume_position(trainer, batches_per_epoch):
    """(epoch, batches already trained in it) where the trainer's fit continues; (0, 0) when fresh."""
    if trainer is None:
        return 0, 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    if done >= batches_per_epoch:
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, done


class SegmentationDataModule(pl.LightningDataModule):
    """Train and validation loaders that stay exact across processes and resumes.

    Training: :class:`EpochSampler`, continued where a resumed checkpoint stopped. Validation:
    each image exactly once over all processes (Lightning's own sampler pads with repeats,
    which the summed metric counts would include). Worker seeds come from a generator of the
    loaders' own, never from the global stream that checkpoints carry.
    """

    def __init__(self, train_set, val_set, batch_size, loader_options=None, seed=0):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.loader_options = dict(loader_options or {})

    def processes(self):
        """(world size, global rank) of the attached trainer; (1, 0) without one."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def _loader(self, dataset, sampler, drop_last):
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(self.seed), **self.loader_options)

    def train_dataloader(self):
        world, rank = self.processes()
        per_process = math.ceil(len(self.train_set) / world)
        if per_process < self.batch_size:
            raise SmoosegError(f"the training set has {len(self.train_set)} images: {per_process} for "
                               f"each of the {world} processes, fewer than batch_size={self.batch_size}; "
                               "lower batch_size (it is per process)")
        epoch, done = resume_position(self.trainer, per_process // self.batch_size)
        sampler = EpochSampler(self.train_set, world, rank, self.seed, epoch, done * self.batch_size)
        return self._loader(self.train_set, sampler, drop_last=True)

    def val_dataloader(self):
        world, rank = self.processes()
        if world == 1:
            return self._loader(self.val_set, None, drop_last=False)
        if len(self.val_set) < world:
            raise SmoosegError(f"the validation set has {len(self.val_set)} images, fewer than the "
                               f"{world} processes; use fewer devices or more validation images")
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_set, sampler, drop_last=False)


def build_datamodule(cfg, module=None):
    """The :class:`SegmentationDataModule` over the data sets :func:`build_dataloaders` checks
    and prepares (cached features included)."""
    train_loader, val_loader = build_dataloaders(cfg, module)
    return SegmentationDataModule(train_loader.dataset, val_loader.dataset, int(cfg.batch_size),
                                  loader_options(cfg), int(cfg.seed))


def last_good_checkpoint(trainer):
    """Path of the last checkpoint this fit wrote (or resumed from), or None."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint) and callback.best_model_path:
            if Path(callback.best_model_path).is_file():
                return callback.best_model_path
    return None


def build_logger(cfg):
    """TensorBoard under ``<output_dir>/tensorboard`` or no logger (``logger=none``)."""
    kind = cfg.logger.type
    if kind == "none":
        return False
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=cfg.output_dir, name="tensorboard", version="",
                                 default_hp_metric=False)
    raise SmoosegError(f"logger.type={kind} is unknown; use logger=tensorboard or logger=none")


def build_callbacks(cfg):
    """Best-by-validation-mIoU checkpoint plus ``last.ckpt`` in ``<output_dir>/checkpoints``.

    Files are overwritten rather than versioned, so ``last.ckpt`` is always the latest state.
    The random streams go into every checkpoint too (:class:`RandomStateCheckpoint`).
    """
    folder = str(Path(cfg.output_dir) / "checkpoints")
    checkpoint = ModelCheckpoint(
        dirpath=folder, filename=BEST_FILENAME,
        monitor="val/cluster/mIoU", mode="max", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False)
    return [checkpoint, LastCheckpoint(folder), RandomStateCheckpoint(), ValidateAtMaxSteps()]


def build_trainer(cfg, callbacks=()):
    """A Lightning Trainer: ``trainer.*`` keys are passed through (``precision: auto`` resolved)."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options["precision"] = resolve_precision(options.get("precision", "auto"),
                                             options.get("accelerator", "auto"))
    accumulate = int(options.get("accumulate_grad_batches", 1))
    # The frozen ViT is in eval mode on purpose (SPEC §1).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    try:
        return pl.Trainer(
            max_steps=int(cfg.max_steps), max_epochs=-1,
            val_check_interval=int(cfg.val_check_interval) * accumulate,
            check_val_every_n_epoch=None, logger=build_logger(cfg),
            callbacks=build_callbacks(cfg) + list(callbacks), default_root_dir=cfg.output_dir, **options)
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
            check_state_dict(module.state_dict(), ckpt["state_dict"], path,
                             describe_model(module.hparams, "configured for this run"))
        if is_reference_layout(ckpt["state_dict"]) or "optimizer_states" not in ckpt:
            raise SmoosegError(f"ckpt_path={path} holds no training state (optimiser, loops); resume "
                               "from a last.ckpt written by train_segmentation.py")
    return str(path)


def save_config(cfg):
    """Write the resolved config to ``<output_dir>/config.yaml``."""
    path = Path(cfg.output_dir) / "config.yaml"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def train(cfg, callbacks=()):
    """Seed, build everything and fit; returns dict(best, last, best_mIoU, output_dir).

    ``callbacks`` are extra Lightning callbacks added to the trainer's own.
    """
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build_module(cfg)
    ckpt_path = resume_path(cfg, module)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, callbacks)
    if trainer.is_global_zero:
        save_config(cfg)
    try:
        with warnings.catch_warnings():
            # EpochSampler does resume mid-epoch (Lightning cannot tell from the loader)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError as err:
        raise SmoosegError(f"non-finite training loss (NaN or inf) at step {err.step}; last good "
                           f"checkpoint: {last_good_checkpoint(trainer) or 'none yet'}; lower the "
                           "learning rates (optim.lr1 / optim.lr2) or check the data") from None
    callback = trainer.checkpoint_callback
    score = callback.best_model_score
    result = {
        "best": callback.best_model_path or None,
        "last": last_good_checkpoint(trainer),
        "best_mIoU": None if score is None else float(score),
        "output_dir": str(cfg.output_dir),
    }
    if trainer.is_global_zero:
        print(f"best checkpoint: {result['best']} (val mIoU {result['best_mIoU']})")
        print(f"last checkpoint: {result['last']}")
    return result
