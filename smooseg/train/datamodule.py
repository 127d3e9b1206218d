"""Training and validation data for Lightning: the data sets a config asks for, their loaders,
and the samplers that keep them exact across processes and resumes.

Training reads the published training sets (the five-crop sets of Cityscapes and COCO-Stuff,
Potsdam's ``labelled_train.txt``; docs/method.md section 7) and validates on centre crops at
``val_res``. With ``cache.enabled`` the training set is the frozen backbone's cached features.
"""

import dataclasses
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from smooseg.data.cropped import CroppedDataset, crop_folder, crop_set_error
from smooseg.data.cropped import crop_command as data_crop_command
from smooseg.data.datasets import build_dataset, check_crop_source, dataset_key, dataset_spec
from smooseg.data.registry import dataset_names
from smooseg.errors import SmoosegError
from smooseg.runtime import accelerator_device
from smooseg.train.feature_cache import check_deterministic, open_or_build


def crop_command(settings, source):
    """The ``crop_datasets.py`` command that writes the cropped training set ``source`` (a dict)."""
    dataset = settings.dataset
    return data_crop_command(settings.data_dir, dataset_spec(dataset.name), source["crop_type"],
                             source["ratio"], dir_name=dataset.dir_name,
                             n_classes=dataset.n_classes or dataset.n_clusters)


def train_crop_source(settings):
    """The pre-cropped training set to read, or None when ``dataset.train_crop_source`` is null.

    The published Cityscapes / COCO-Stuff runs train on the five-crop sets; a missing set stops
    training with the command that writes it, rather than training on other data (an incomplete
    one stops when it is read, :class:`CroppedDataset`, with the same message).
    """
    dataset = settings.dataset
    if dataset.train_crop_source is None:
        return None
    source = dataclasses.asdict(dataset.train_crop_source)
    check_crop_source(source)
    folder = crop_folder(settings.data_dir, dataset_key(dataset.name, dataset.dir_name),
                         source["crop_type"], source["ratio"])
    if not folder.is_dir():
        raise crop_set_error(folder, "does not exist", crop_command(settings, source), verb="write")
    return source


def train_split(settings):
    """The training split: Potsdam adds its unlabelled tiles only with ``dataset.train_unlabelled``."""
    if settings.dataset.train_unlabelled:
        split = dataset_spec(settings.dataset.name).train_unlabelled_split
        if split is None:
            able = [n for n in dataset_names() if dataset_spec(n).train_unlabelled_split]
            raise SmoosegError(f"dataset.train_unlabelled=true is for {', '.join(able)} only, not "
                               f"{settings.dataset.name}; remove it")
        return split
    return "train"


def build_datasets(settings):
    """(train set, validation set); validation uses centre crops at ``val_res`` (the training
    resolution unless set, as the reference validates)."""
    dataset = settings.dataset
    common = dict(name=dataset.name, data_dir=settings.data_dir, image_interp=dataset.image_interp,
                  n_classes=dataset.n_classes, n_clusters=dataset.n_clusters, dir_name=dataset.dir_name,
                  seed=settings.seed)
    train_set = build_dataset(split=train_split(settings), res=settings.res, crop=dataset.train_crop,
                              crop_source=train_crop_source(settings), **common)
    val_set = build_dataset(split="val", res=settings.val_res, crop="center", **common)
    return train_set, val_set


def loader_options(settings):
    """DataLoader keyword arguments from ``num_workers`` and the (resolved) ``loader`` section."""
    workers, loader = settings.num_workers, settings.loader
    options = dict(num_workers=workers, pin_memory=bool(loader.pin_memory))
    if workers > 0:
        options["persistent_workers"] = loader.persistent_workers
        if loader.prefetch_factor is not None:
            options["prefetch_factor"] = loader.prefetch_factor
    return options


def check_probe_labels(settings, train_set):
    """With ``linear_probe`` every training image needs a label (the probe is supervised)."""
    if not settings.linear_probe:
        return
    unlabelled = [entry[0] for entry in getattr(train_set, "entries", ()) if entry[2] is None]
    if unlabelled:
        raise SmoosegError(f"linear_probe=true needs labelled training images but {len(unlabelled)} "
                           f"have no label (e.g. {unlabelled[0]}); add labels or set linear_probe=false")


def cached_train_set(settings, train_set, net):
    """The training set's backbone features from the feature cache, built on first use.

    Refuses random crops (the cache would not match what training sees) before building anything.
    """
    dataset, cache = settings.dataset, settings.cache
    check_deterministic(dataset.train_crop)
    source = train_crop_source(settings) if isinstance(train_set, CroppedDataset) else None
    device = accelerator_device(settings.trainer.accelerator)
    return open_or_build(
        train_set, net.backbone, cache.dir, dataset_key(dataset.name, dataset.dir_name),
        "train", settings.res, dataset.train_crop, dataset.image_interp, crop_source=source,
        dtype=cache.dtype, batch_size=cache.batch_size, num_workers=settings.num_workers, device=device,
        precision=net.backbone_precision, data_dir=settings.data_dir)


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


def build_datamodule(settings, net=None):
    """A :class:`SegmentationDataModule` over the configured data sets, checked and prepared.

    With ``cache.enabled`` the training set is replaced by the cached backbone features of the
    same images in the same order; ``net`` (whose backbone fills the cache) is then required.
    """
    train_set, val_set = build_datasets(settings)
    check_probe_labels(settings, train_set)
    batch_size = settings.batch_size
    if len(train_set) < batch_size:
        raise SmoosegError(f"the training set has {len(train_set)} images, fewer than batch_size="
                           f"{batch_size}; lower batch_size")
    if settings.cache.enabled:
        if net is None:
            raise ValueError("build_datamodule: cache.enabled needs the net whose backbone fills it")
        train_set = cached_train_set(settings, train_set, net)
    return SegmentationDataModule(train_set, val_set, batch_size, loader_options(settings), settings.seed)
