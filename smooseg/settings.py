"""The settings of the five entry points, one typed schema each: a setting's default, type, allowed
values and range are declared here, together, once.

Each schema is a dataclass registered with Hydra's ConfigStore (``<name>_schema``); the entry's YAML
(``smooseg/configs/<name>.yaml``) lists it first in its defaults, so Hydra itself refuses a value
of the wrong type (``batch_size=2.5``, ``flip=maybe``) and a key the schema lacks, and the presets
(data sets, models, trainers, experiments) compose on top. :func:`train_settings`,
:func:`eval_settings`, :func:`segment_settings`, :func:`crop_settings` and
:func:`download_settings` then turn the composed config into the schema's dataclass, check every
allowed value and range (one line naming the key and what it may be), and resolve each ``auto``
into the concrete value the run uses; the library takes these instances, never a Hydra config.

A setting's rule lives in its field's metadata (:func:`setting`): ``choices``, ``low`` / ``high``
(inclusive) or ``above`` (exclusive lower bound), ``each`` (the allowed values of a list's
entries) and ``section`` (the dataclass of a section that may be null: it is composed untyped, so
that a key set under a null section is answered with how to set it whole, and typed here). A list
setting given a bare string (``datasets=cityscapes``) is a one-element list.
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from smooseg.data.transforms import CROPS
from smooseg.errors import SmoosegError
from smooseg.eval.crf_backend import CRF_BACKENDS
from smooseg.model.backbone import FEAT_TYPES
from smooseg.model.backbones import FITS
from smooseg.model.losses import LossConfig
from smooseg.model.weights import WEIGHTS_SOURCES
from smooseg.runtime import PRECISION_DTYPES, accelerator_device, lightning_precision

SEED_MAX = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything feeds
PRECISIONS = ("auto", *PRECISION_DTYPES)
BACKBONE_PRECISIONS = ("auto", "32", "bf16", "16")
LOGGERS = ("tensorboard", "csv", "wandb", "mlflow", "none")


def setting(default=MISSING, *, choices=None, low=None, high=None, above=None, each=None, section=None,
            factory=None, open_keys=None):
    """A dataclass field with its rule (see the module docstring). ``open_keys``: a mapping whose
    keys the user names (``sizes.cityscapes=123`` adds one; Hydra refuses new keys otherwise)."""
    rule = {k: v for k, v in dict(choices=choices, low=low, high=high, above=above, each=each,
                                  section=section, open_keys=open_keys).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=rule)
    return field(default=default, metadata=rule)


# ---------------------------------------------------------------- sections shared by the schemas
@dataclass
class ModelSettings:
    """The backbone and heads. The (arch, model_type, patch_size) triple and ``weights_data`` are
    checked against the backbone registry (smooseg/model/backbones.py), not listed here."""

    arch: str = "dino"                      # dino | dinov2 | dinov2_reg | dinov3 (README "Weights")
    model_type: str = "vit_small"           # vit_small | vit_base | vit_large | vit_giant | vit_small_plus |
                                            # vit_huge_plus (which exist per arch: README "Weights")
    patch_size: int = setting(8, low=1)     # dino 8 | 16, dinov2 and dinov2_reg 14, dinov3 16
    feat_type: str = setting("feat", choices=FEAT_TYPES)  # last block (final norm) | last attention keys
    pretrained: bool = True                 # false: random init (testing only)
    weights_path: str | None = None         # null: the cache (torch hub; Hugging Face for
                                            # weights_source=timm)
    weights_url: str | None = None          # a mirror of the official file, or the personal URL of a gated
                                            # (DINOv3) release; the cached file keeps the official name
    weights_source: str = setting("official", choices=WEIGHTS_SOURCES)  # official (Meta's release file) |
                                            # timm (timm's copy, timm's key layout)
    weights_data: str | None = None         # null: the backbone's default release; dinov3 vit_large:
                                            # lvd1689m | sat493m (SAT-493M brings its own input normalisation)
    fit: str | None = setting(None, choices=FITS)  # H/W not a multiple of the patch: error | resize |
                                            # pad; null: the backbone's default (resize for dinov2, else
                                            # error)
    fused_attn: bool = True                 # timm's fused attention kernel (same features, faster)
    dim: int = setting(64, low=1)           # code dimension D
    projection_type: str = setting("nonlinear", choices=("nonlinear", "linear"))  # nonlinear (linear + MLP
                                            # branch) | linear
    dropout: bool = True                    # Dropout2d(0.2) on the projector inputs and the smoothness signal


@dataclass
class CropSource:
    """A pre-cropped training set written by ``crop_datasets.py``."""

    crop_type: str = setting("five", choices=("five", "random"))  # five | random
    ratio: float = setting(0.5, above=0.0, high=1.0)  # crop side = ratio x each image side


@dataclass
class DatasetSettings:
    """A data set (the ``dataset`` group); its name is checked against the data set registry."""

    name: str = MISSING
    n_classes: int | None = setting(None, low=1)   # directory sets with labels: the number of classes
    n_clusters: int | None = setting(None, low=1)  # directory sets without labels: clusters to find
    dir_name: str | None = None             # directory sets: <data_dir>/<dir_name> (null: data_dir)
    train_crop: str = setting("center", choices=CROPS)  # training crops: center | random | none
    train_crop_source: Any = setting(None, section=CropSource)  # a CropSource; null: the raw images
    image_interp: str = setting("nearest", choices=("nearest", "bilinear"))  # image resizing: nearest
                                            # (reference quirk) | bilinear
    train_unlabelled: bool = False          # potsdam: also the unlabelled tiles


@dataclass
class OptimSettings:
    """Adam learning rates."""

    lr1: float = setting(1.0e-4, above=0.0)        # projector
    lr2: float = setting(5.0e-4, above=0.0)        # student prototypes
    linear_lr: float = setting(5.0e-3, above=0.0)  # linear probe (STEGO's value; only with linear_probe)


@dataclass
class LoaderSettings:
    """DataLoader settings that keep the GPU fed."""

    persistent_workers: bool = True         # keep worker processes alive between epochs (num_workers > 0)
    pin_memory: Any = setting("auto", choices=("auto", True, False))  # auto: on a CUDA GPU
    prefetch_factor: int | None = setting(2, low=1)  # batches each worker loads ahead (num_workers > 0)


@dataclass
class CacheSettings:
    """The backbone feature cache: the frozen backbone runs once per training image."""

    enabled: bool = False                   # needs deterministic crops (dataset.train_crop=center)
    dir: str = "${data_dir}/feature_cache"  # a sub-folder per key (data set, crops, backbone, weights, dtype)
    dtype: str = setting("float16", choices=("float16", "float32"))  # float32: bit-exact features
    batch_size: int | None = setting(None, low=1)  # images per backbone batch (null: batch_size)


@dataclass
class FinalEvalSettings:
    """When training ends: the best checkpoint (else last.ckpt) evaluated as eval_segmentation.py
    would (val split, eval_res, centre crops) into ``<output_dir>/final_eval/metrics.json``."""

    enabled: bool = True                      # false: no evaluation when training ends
    crf: bool = False                       # true: dense CRF on top (the headline is then after it)
    crf_backend: str = setting("auto", choices=CRF_BACKENDS)  # auto: torch on a CUDA GPU, else pydensecrf
    crf_workers: Any = setting("auto", low=0)  # pydensecrf processes: auto (one per core) | 0 | n
    crf_timeout: float = setting(120.0, above=0.0)  # seconds without any CRF job finishing
    flip: bool = True                       # horizontal-flip averaging
    n_images: int = setting(0, low=0)       # example pictures saved next to metrics.json
    batch_size: int = setting(8, low=1)       # images per evaluation batch
    precision: str = setting("32", choices=PRECISIONS)  # autocast of the evaluation pass


@dataclass
class PerfSettings:
    """Speed: the frozen backbone's precision and torch.compile."""

    backbone_precision: str = setting("auto", choices=BACKBONE_PRECISIONS)  # auto: as the trainer
    compile: bool = False                   # torch.compile the frozen backbone and the heads + loss


@dataclass
class TrainerSettings:
    """The Lightning Trainer arguments this project sets; ``extra`` holds any other one given as
    ``+trainer.<argument>=...``, passed to the Trainer as it is."""

    accelerator: str = "auto"               # auto (gpu when CUDA is there, else cpu) | cpu | gpu | ...
    devices: Any = 1                        # n | -1 (all) | auto | [0, 1]
    num_nodes: int = setting(1, low=1)
    strategy: str = "auto"                    # auto | ddp | ... (trainer=ddp sets it)
    precision: str = setting("auto", choices=PRECISIONS)  # auto: bf16-mixed on bf16 GPUs, 16-mixed on
                                            # other GPUs, 32-true on CPU
    accumulate_grad_batches: int = setting(1, low=1)
    log_every_n_steps: int = setting(10, low=1)  # scalars logged every N steps
    num_sanity_val_steps: int = setting(2, low=-1)
    deterministic: bool = False               # deterministic algorithms (slower)
    enable_progress_bar: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerSettings:
    """Where training logs its scalars and pictures (``logger`` group); ``none`` logs nowhere."""

    type: str = setting("tensorboard", choices=LOGGERS)  # tensorboard | csv | wandb | mlflow | none
    project: str | None = None                # W&B / MLflow project (null: smooseg)
    entity: str | None = None                 # W&B team or user
    name: str | None = None                   # run name (null: the run folder's name)
    tags: list[str] = field(default_factory=list)  # run tags
    tracking_uri: str | None = None           # MLflow server (null: MLFLOW_TRACKING_URI, else
                                            # <output_dir>/mlruns)


def trainer_defaults():
    """TrainerSettings' defaults as a plain dict (without ``extra``), the composed ``trainer`` node."""
    return {f.name: f.default for f in dataclasses.fields(TrainerSettings) if f.name != "extra"}


# ---------------------------------------------------------------- one schema per entry point
@dataclass
class TrainSettings:
    """train_segmentation.py (``smooseg/configs/train.yaml`` composes the groups on top)."""

    data_dir: str = "${oc.env:SMOOSEG_DATA,data}"   # holds cityscapes/, cocostuff/, potsdam/, cropped/
    output_dir: str = "outputs/train/${dataset.name}_${now:%Y-%m-%d_%H-%M-%S}"  # the run's folder:
                                            # checkpoints, logs, config.yaml, final_eval/
    seed: int = setting(0, low=0, high=SEED_MAX)  # seeds torch, numpy, random and the data loader workers
    res: int = setting(224, low=1)          # training crop size
    val_res: int = setting("${res}", low=1)  # validation during training: centre crops at this size
    eval_res: int = setting(320, low=1)     # the final evaluation's resolution, recorded in checkpoints
    batch_size: int = setting(32, low=1)      # images per training batch (per process under DDP)
    num_workers: int = setting(4, low=0)    # DataLoader worker processes
    max_steps: int = setting(3000, low=1)     # optimiser steps
    val_check_interval: int = setting(400, low=1)  # validate and checkpoint every N optimiser steps
    ckpt_path: str | None = None            # resume: null | last (<output_dir>/checkpoints/last.ckpt) | path
                                            # | auto (finish what the folder holds: kept if finished,
                                            # resumed, or started; a stopped -m sweep: the same command)
    resume_changes: bool = False            # resume with settings that alter the run (RUN_DEFINING) changed:
                                            # apply them from the checkpoint's step on, instead of refusing
    extra_clusters: int = setting(0, low=0)   # clusters beyond the number of classes
    mask_extra_clusters: bool = False       # reference quirk: drop pixels predicted as extra clusters
    n_log_images: int = setting(4, low=0)   # validation images drawn to TensorBoard
    linear_probe: bool = False              # supervised diagnostic (docs/shift_tuning.md)
    hist_freq: int = setting(0, low=0)      # every N steps the smoothness terms' histograms; 0 = off
    dataset: DatasetSettings = MISSING
    model: ModelSettings = field(default_factory=ModelSettings)
    trainer: Any = field(default_factory=lambda: trainer_defaults())  # composed as a dict (so
                                            # +trainer.<arg>=... adds any Lightning argument);
                                            # train_settings makes it a TrainerSettings
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    final_eval: FinalEvalSettings = field(default_factory=FinalEvalSettings)
    perf: PerfSettings = field(default_factory=PerfSettings)


@dataclass
class EvalSettings:
    """eval_segmentation.py."""

    model_paths: Any = setting(each=str)    # checkpoints or glob patterns (required)
    data_dir: str = "${oc.env:SMOOSEG_DATA,data}"  # folder holding cityscapes/, cocostuff/, potsdam/,
                                            # cropped/
    dataset: DatasetSettings | None = None  # null: the checkpoint's data set
    split: str = "val"                        # the split evaluated
    eval_res: int | None = setting(None, low=1)  # null: the checkpoint's evaluation resolution
    image_interp: str | None = setting(None, choices=("nearest", "bilinear"))  # null: as in training
    batch_size: int = setting(8, low=1)       # images per batch
    num_workers: int = setting(2, low=0)      # DataLoader worker processes
    crf: bool = True                        # dense CRF on top (metrics without it are reported too)
    crf_backend: str = setting("auto", choices=CRF_BACKENDS)  # auto: torch on a CUDA GPU, else pydensecrf
    crf_workers: Any = setting("auto", low=0)  # pydensecrf processes: auto (one per core, at most 32) | n
    crf_timeout: float = setting(120.0, above=0.0)  # seconds without any CRF job finishing
    flip: bool = True                       # horizontal-flip averaging
    n_images: int = setting(8, low=0)       # pictures saved for the first n images
    report: bool = False                    # also per_class_iou.png, confusion.png and examples.png
    output_dir: str = "outputs/eval"          # one folder per checkpoint: <stem>-<sha256[:10]>/, and
                                            # summary.json
    device: str = "auto"                    # auto | cpu | cuda | cuda:1
    precision: str = setting("32", choices=PRECISIONS)  # 32 | bf16-mixed | 16-mixed (autocast of the
                                            # evaluation pass)


@dataclass
class SegmentSettings:
    """segment_images.py."""

    model_path: str = MISSING               # a checkpoint (this package's or the reference release's)
    input_dir: str = MISSING                # folder of images
    output_dir: str = "outputs/segment"       # pictures go here, one set per image, named after it
    recursive: bool = False                 # also images in subfolders (mirrored in output_dir)
    mode: str = setting("resize", choices=("resize", "window"))  # resize: shorter side -> size, prediction
                                            # upsampled back | window: sliding windows
    size: int = setting(320, low=1)         # resize: shorter side fed to the network; window: window side
    stride: int | None = setting(None, low=1)  # window step in pixels (null: size // 2)
    batch_size: int = setting(8, low=1)     # windows per forward pass (window mode)
    flip: bool = True                         # horizontal-flip averaging
    crf: bool = False                         # dense CRF refinement
    crf_backend: str = setting("auto", choices=CRF_BACKENDS)  # auto (torch on a CUDA GPU, pydensecrf on a
                                            # CPU) | pydensecrf | torch
    crf_workers: Any = setting(0, low=0)    # pydensecrf processes: 0 (in-process) | n | auto
    crf_timeout: float = setting(120.0, above=0.0)  # seconds without any CRF job finishing before giving up
    crf_max_pixels: int = setting(4_000_000, low=1)  # larger images are refined at this many pixels
    crf_max_memory: Any = "auto"            # auto (the memory available now) | bytes | 8GB
    save_ids: bool = False                  # also the raw cluster ids (<stem>_ids.png)
    metrics_json: str | None = None         # metrics.json of an evaluation: colour by class, legend
    alpha: float = setting(0.5, low=0.0, high=1.0)  # mask opacity in the overlay
    skip_bad: bool = False                  # skip unreadable images with a warning
    progress: bool = True                     # progress bar
    device: str = "auto"                      # auto | cpu | cuda | cuda:1
    precision: str = setting("32", choices=PRECISIONS)  # 32 | bf16-mixed | 16-mixed (autocast of the network)


@dataclass
class CropSettings:
    """crop_datasets.py."""

    data_dir: str = "data"                  # folder holding cityscapes/, cocostuff/, potsdam/, <dir_name>/
    datasets: Any = setting(factory=lambda: ["cityscapes", "cocostuff27"], each=str)  # any data set name
                                            # (one module each in smooseg/data/sets/)
    splits: Any = setting(factory=lambda: ["train"], each=str)  # the splits to crop
    crop_types: Any = setting(factory=lambda: ["five"], each=("five", "random"))  # five (4 corners + centre)
                                            # and/or random (5 seeded crops)
    crop_ratio: float = setting(0.5, above=0.0, high=1.0)  # crop side = crop_ratio x each image side
    seed: int = setting(0, low=0, high=SEED_MAX)  # random crops of an image depend only on (seed, its name)
    num_workers: int = setting(4, low=0)    # worker processes (0 = in-process)
    jpeg_quality: int = setting(75, low=1, high=100)  # Pillow's default, as the reference saves crops
    dir_dataset_name: str | None = None     # directory data set: folder <data_dir>/<dir_dataset_name>
    dir_dataset_n_classes: int | None = setting(None, low=1)  # directory data set: number of classes
                                            # (without labels: the clusters)
    progress: bool = True                     # progress bar


@dataclass
class DownloadSettings:
    """download_datasets.py."""

    data_dir: str = "data"                    # folder the data sets are extracted into
    datasets: Any = setting(factory=lambda: ["cityscapes", "cocostuff", "potsdam", "potsdamraw"], each=str)
                                            # archive names, or data set names (their archives)
    base_url: str = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/"  # where
                                            # <name>.zip is hosted; point it at a mirror when the host moved
    keep_archive: bool = False              # keep <name>.zip after extraction
    sizes: dict[str, int] = setting(factory=dict, open_keys=True)  # expected archive sizes in bytes:
                                            # sizes.<archive>=<bytes>
    sha256: dict[str, str] = setting(factory=dict, open_keys=True)  # archive checksums:
                                            # sha256.<archive>=<64 hex digits>
    timeout: float = setting(60.0, above=0.0)  # seconds without data before a connection counts as failed
    progress: bool = True                     # progress bar


# The training settings whose change alters a run (a resume compares them with the run's last
# segment): sections by name, less the keys that only say how it runs (weights to start from, ...).
RUN_DEFINING = ("seed", "res", "val_res", "eval_res", "batch_size", "extra_clusters", "mask_extra_clusters",
                "linear_probe", "dataset", "model", "loss", "optim", "trainer.precision",
                "trainer.accumulate_grad_batches", "perf.backbone_precision")
HOW_IT_RUNS = ("model.pretrained", "model.weights_path", "model.weights_url", "model.weights_source",
               "model.fused_attn")

SCHEMAS = {"train": TrainSettings, "eval": EvalSettings, "segment": SegmentSettings,
           "crop": CropSettings, "download": DownloadSettings}


def register():
    """Register each schema with Hydra's ConfigStore as ``<entry>_schema`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        node = OmegaConf.structured(schema)
        for key in open_keys(schema):
            OmegaConf.set_struct(OmegaConf.select(node, key), False)
        store.store(name=f"{name}_schema", node=node)


def open_keys(schema, prefix=""):
    """The dotted keys of ``schema``'s mappings declared with ``open_keys`` (sections searched)."""
    for f in dataclasses.fields(schema):
        if f.metadata.get("open_keys"):
            yield prefix + f.name
        elif dataclasses.is_dataclass(f.type):
            yield from open_keys(f.type, f"{prefix}{f.name}.")


register()


# ---------------------------------------------------------------- checking
def describe(rule, kind):
    """What a value of a setting with ``rule`` may be, e.g. "an integer >= 1", "a number in (0, 1]"."""
    if "choices" in rule:
        names = (str(c).lower() if isinstance(c, bool) else str(c) for c in rule["choices"])
        return "one of " + ", ".join(names)
    noun = {"int": "an integer", "bool": "true or false", "any": "auto or an integer"}.get(kind, "a number")
    low, high, above = rule.get("low"), rule.get("high"), rule.get("above")
    bound = above if above is not None else low
    opening = "(" if above is not None else "["
    if bound is not None and high is not None:
        return f"{noun} in {opening}{bound}, {high}]"
    if bound is not None:
        return f"{noun} {'>' if above is not None else '>='} {bound}"
    if high is not None:
        return f"{noun} <= {high}"
    return noun


def _kind(annotation):
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(annotation, "any")


def _field_kind(f):
    annotation = f.type
    args = getattr(annotation, "__args__", ())
    if args and type(None) in args:  # Optional[X]
        annotation = next(a for a in args if a is not type(None))
    return _kind(annotation)


def _fits(value, rule, kind):
    if "choices" in rule:
        return any(value == c and type(value) is type(c) for c in rule["choices"])
    if kind == "any" and value == "auto":  # crf_workers: auto or a count
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind in ("int", "any") and not isinstance(value, int) or not math.isfinite(value):
        return False
    if "above" in rule and value <= rule["above"]:
        return False
    if "low" in rule and value < rule["low"]:
        return False
    return "high" not in rule or value <= rule["high"]


def _as_list(value, key, each):
    """A list setting's value as a list of strings (a bare string is a one-element list)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SmoosegError(f"{key}={value} must be a list, e.g. {key}=[a,b]")
    for entry in value:
        allowed = each if isinstance(each, tuple) else None
        if not isinstance(entry, str) or (allowed and entry not in allowed):
            what = f"one of {', '.join(allowed)}" if allowed else "a name or path"
            raise SmoosegError(f"{key}={value} is not allowed: each entry of {key} must be {what}")
    return list(value)


def check_values(settings, prefix=""):
    """Check every field of the dataclass ``settings`` (and its sections) against its rule; raises
    SmoosegError naming the first bad key. List settings are normalised in place. Returns ``settings``."""
    for f in dataclasses.fields(settings):
        key, value = f"{prefix}{f.name}", getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{key}.")
            continue
        rule = _rule(f)
        if "section" in rule and value is not None:
            setattr(settings, f.name, check_values(_section(value, rule["section"], key), f"{key}."))
            continue
        if "each" in rule:
            setattr(settings, f.name, _as_list(value, key, rule["each"]))
            continue
        if value is None or not rule:
            continue
        kind = _field_kind(f)
        if not _fits(value, rule, kind):
            shown = str(value).lower() if isinstance(value, bool) else value
            raise SmoosegError(f"{key}={shown} is not allowed: {key} must be {describe(rule, kind)}")
    return settings


def _section(value, cls, key):
    """The dataclass ``cls`` from the plain dict ``value`` of the section ``key``."""
    if dataclasses.is_dataclass(value):
        return value
    if not isinstance(value, dict):
        raise SmoosegError(f"{key}={value} is not allowed: {key} must be null or a section "
                           f"{{{', '.join(f.name + ':...' for f in dataclasses.fields(cls))}}}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value))
    except Exception as err:
        from omegaconf.errors import ConfigKeyError, ValidationError

        if not isinstance(err, (ConfigKeyError, ValidationError)):
            raise
        inner = getattr(err, "full_key", None) or "?"
        found = field_rule(cls, inner)
        if found is None:
            raise SmoosegError(f"unknown config key '{key}.{inner}'; {key} holds "
                               f"{', '.join(f.name for f in dataclasses.fields(cls))}") from None
        raise SmoosegError(f"{key}.{inner}={value.get(inner)} is not allowed: {key}.{inner} must be "
                           f"{describe(*found)}") from None


def field_rule_section(schema, dotted):
    """The dataclass of the section ``dotted`` of ``schema`` ("" is ``schema`` itself), or None."""
    for part in [p for p in dotted.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            return None
        inner = fields[part].metadata.get("section", fields[part].type)
        args = getattr(inner, "__args__", ())
        schema = next((a for a in args if a is not type(None)), inner) if args else inner
    return schema if dataclasses.is_dataclass(schema) else None


def field_rule(schema, dotted):
    """(rule, kind) of the setting ``dotted`` of the dataclass ``schema``, or None."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    if head not in fields:
        return None
    f = fields[head]
    if rest and f.metadata.get("open_keys") and "." not in rest:  # one entry of a user-keyed mapping
        return {}, _kind(getattr(f.type, "__args__", (None, None))[1])
    if rest:
        inner = f.metadata.get("section", f.type)
        args = getattr(inner, "__args__", ())
        inner = next((a for a in args if a is not type(None)), inner) if args else inner
        return field_rule(inner, rest)
    return _rule(f), _field_kind(f)


def _rule(f):
    """The value rule of the field ``f`` (its metadata less ``open_keys``, which is about keys)."""
    return {key: value for key, value in f.metadata.items() if key != "open_keys"}


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")  # what OmegaConf reads as a boolean


def check_bool_words(overrides, schema):
    """Refuse a command-line override of a boolean setting whose value is not one of ``BOOL_WORDS``
    (OmegaConf would read ``flip=2`` as true)."""
    for word in overrides:
        key, sep, value = word.partition("=")
        key = key.lstrip("+~")
        found = field_rule(_TrainerRoot if key.startswith("trainer.") and schema is TrainSettings else schema,
                           key)
        if sep and found is not None and found[1] == "bool" and value.strip("'\" ").lower() not in BOOL_WORDS:
            raise SmoosegError(f"{key}={value} is not allowed: {key} must be true or false "
                               "(also yes/no, on/off, 1/0)")


def _hydra_overrides():
    """The command-line overrides of the running Hydra job ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # words as typed


def _to_object(cfg, schema):
    """The dataclass ``schema`` from the composed ``cfg``; an unset environment variable or other
    interpolation that cannot be resolved is one line naming it."""
    check_bool_words(_hydra_overrides(), schema)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except InterpolationResolutionError as err:
        key = getattr(err, "full_key", None) or "a config key"
        variable = re.search(r"Environment variable '([^']+)' not found", str(err))
        if variable:
            raise SmoosegError(f"config key '{key}' reads the environment variable {variable.group(1)}, "
                               f"which is not set; set it (export {variable.group(1)}=...) or pass "
                               f"{key}=...") from None
        raise SmoosegError(f"config key '{key}' cannot be resolved ({str(err).splitlines()[0]}); pass "
                           f"{key}=...") from None
    except MissingMandatoryValue:
        raise
    except Exception as err:  # a key the schema lacks (+key=...), a value of the wrong type
        from omegaconf.errors import ConfigKeyError, ValidationError

        if not isinstance(err, (ConfigKeyError, ValidationError)):
            raise
        key = getattr(err, "full_key", None) or "a config key"
        if isinstance(err, ConfigKeyError):
            section, _, _ = key.rpartition(".")
            owner = field_rule_section(schema, section)
            names = ", ".join(f.name for f in dataclasses.fields(owner)) if owner else ""
            raise SmoosegError(f"{key} is not one of the {section or 'top-level'} settings ({names}); "
                               "remove it") from None
        found = field_rule(schema, key)
        value = OmegaConf.select(cfg, key, default="?", throw_on_resolution_failure=False)
        what = describe(*found) if found else str(err).splitlines()[0]
        raise SmoosegError(f"{key}={value} is not allowed: {key} must be {what}") from None


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)


# ---------------------------------------------------------------- resolving each "auto" once
def backbone_precision(requested, trainer_precision):
    """The frozen backbone's precision: ``auto`` follows the trainer's (32-true -> 32,
    bf16-mixed -> bf16, 16-mixed -> 16); anything else as requested."""
    if requested != "auto":
        return requested
    return {"32-true": "32", "bf16-mixed": "bf16", "16-mixed": "16"}[trainer_precision]


def crf_choice(backend, workers, device):
    """(backend, worker count) of a CRF setting pair on ``device``, each ``auto`` resolved."""
    from smooseg.eval.crf_backend import resolve_backend
    from smooseg.eval.crf_pool import resolve_workers

    return resolve_backend(backend, device), resolve_workers(workers)


def _trainer(values):
    known = {f.name for f in dataclasses.fields(TrainerSettings)} - {"extra"}
    values = dict(values or {})
    extra = {k: values.pop(k) for k in list(values) if k not in known}
    trainer = _to_object(OmegaConf.create({"trainer": values}), _TrainerRoot).trainer
    trainer.extra = {**extra, **trainer.extra}
    return trainer


@dataclass
class _TrainerRoot:
    trainer: TrainerSettings = field(default_factory=TrainerSettings)


def check_model(model):
    """The backbone triple must be one the backbone registry knows, and ``weights_data`` one of its
    releases."""
    from smooseg.model.backbones import backbone_spec

    try:
        spec = backbone_spec(model.arch, model.model_type, model.patch_size)
    except SmoosegError as err:
        raise SmoosegError(f"{err}; set model.arch, model.model_type and model.patch_size, or choose a "
                           "model=<preset>") from None
    spec.release(model.weights_data)


def check_dataset(dataset):
    """The data set name must be one the data set registry knows (directory sets need a count)."""
    from smooseg.data.datasets import n_classes_of

    n_classes_of(dataset.name, dataset.n_classes, n_clusters=dataset.n_clusters)


def train_settings(cfg):
    """The :class:`TrainSettings` of a composed training config: checked, every ``auto`` resolved."""
    from smooseg.runtime import check_accelerator

    values = _plain(cfg)
    trainer = _trainer(OmegaConf.to_container(cfg.trainer, resolve=True) if OmegaConf.is_config(cfg)
                       else values.get("trainer"))
    values["trainer"] = None
    settings = check_values(_to_object(OmegaConf.create(values), TrainSettings))
    settings.trainer = check_values(trainer, "trainer.")
    check_model(settings.model)
    check_dataset(settings.dataset)
    check_accelerator(trainer.accelerator)
    device = accelerator_device(trainer.accelerator)
    if trainer.accelerator == "auto":
        trainer.accelerator = "gpu" if device == "cuda" else "cpu"
    trainer.precision = lightning_precision(trainer.precision, device)
    settings.perf.backbone_precision = backbone_precision(settings.perf.backbone_precision, trainer.precision)
    if settings.loader.pin_memory == "auto":
        settings.loader.pin_memory = device == "cuda"
    final = settings.final_eval
    final.crf_backend, final.crf_workers = crf_choice(final.crf_backend, final.crf_workers, device)
    final.precision = lightning_precision(final.precision, device)
    if settings.cache.batch_size is None:
        settings.cache.batch_size = settings.batch_size
    return settings


def _device(device):
    from smooseg.runtime import resolve_device

    return str(resolve_device(device))


def eval_settings(cfg):
    """The :class:`EvalSettings` of a composed evaluation config: checked, device, CRF backend and
    workers and precision resolved. A ``dataset`` group without its ``n_classes`` takes the
    checkpoint's."""
    values = _plain(cfg)
    dataset = values.get("dataset")
    if isinstance(dataset, dict) and dataset.get("n_classes") == "???":
        dataset["n_classes"] = None
    return _resolve_inference(check_values(_to_object(OmegaConf.create(values), EvalSettings)))


def segment_settings(cfg):
    """The :class:`SegmentSettings` of a composed segmentation config: checked, device, CRF backend
    and workers and precision resolved."""
    from smooseg.eval.segment import parse_bytes

    settings = check_values(_to_object(cfg, SegmentSettings))
    parse_bytes(settings.crf_max_memory)
    return _resolve_inference(settings)


def _resolve_inference(settings):
    """Evaluation's and segmentation's ``auto`` values: the device, then the CRF backend and
    worker count and the precision on it."""
    settings.device = _device(settings.device)
    settings.crf_backend, settings.crf_workers = crf_choice(settings.crf_backend, settings.crf_workers,
                                                            settings.device)
    settings.precision = lightning_precision(settings.precision, settings.device)
    return settings


def crop_settings(cfg):
    """The checked :class:`CropSettings` of a composed crop config."""
    return check_values(_to_object(cfg, CropSettings))


def download_settings(cfg):
    """The checked :class:`DownloadSettings` of a composed download config."""
    return check_values(_to_object(cfg, DownloadSettings))


def to_yaml(settings):
    """The settings as YAML (what a run writes to its ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(settings))
