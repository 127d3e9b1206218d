"""Hydra configs: every group option and preset composes, presets hold the published settings
(docs/method.md §8), both override styles."""

import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT
from smooseg.cli import config_error_message, translate_args
from smooseg.errors import SmoosegError
from smooseg.settings import train_settings

CONFIGS = ROOT / "smooseg" / "configs"

# docs/method.md §8: dataset, (arch, model_type, patch), res, eval_res, batch, pos_intra_shift,
# neg_inter_shift, seed
PUBLISHED = {
    "cocostuff27_vits8": ("cocostuff27", ("dino", "vit_small", 8), 224, 320, 32, -0.02, 0.48, 123456),
    "cityscapes_vits8": ("cityscapes", ("dino", "vit_small", 8), 224, 320, 32, -0.02, 0.5, 0),
    "potsdam_vitb8": ("potsdam", ("dino", "vit_base", 8), 224, 224, 32, 0.1, 0.5, 0),
    "potsdam_dinov2_vitb14": ("potsdam", ("dinov2", "vit_base", 14), 224, 224, 32, 0.32, 0.5, 0),
}


def compose_cfg(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("experiment", sorted(PUBLISHED))
def test_published_presets(experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    dataset, (arch, model_type, patch), res, eval_res, batch, pos, neg, seed = PUBLISHED[experiment]
    assert cfg.dataset.name == dataset
    assert (cfg.model.arch, cfg.model.model_type, cfg.model.patch_size) == (arch, model_type, patch)
    assert (cfg.res, cfg.eval_res, cfg.batch_size, cfg.seed) == (res, eval_res, batch, seed)
    assert (cfg.loss.pos_intra_shift, cfg.loss.neg_inter_shift) == (pos, neg)
    assert (cfg.loss.temperature, cfg.loss.ema_alpha, cfg.loss.pointwise) == (0.1, 0.998, True)
    assert (cfg.optim.lr1, cfg.optim.lr2, cfg.model.dim) == (1e-4, 5e-4, 64)
    assert cfg.val_check_interval == 400 and cfg.model.pretrained is True
    assert cfg.max_steps == 3000 and cfg.val_res == res  # validation at the training resolution
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", sorted(PUBLISHED))
def test_every_preset_value_names_its_source(experiment):
    lines = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    values = [line for line in lines if line.strip() and not line.lstrip().startswith("#")
              and not line.rstrip().endswith(":")]
    assert values and all("#" in line for line in values), [v for v in values if "#" not in v]


def test_validation_resolution_defaults_to_the_training_resolution():
    cfg = compose_cfg("train", ["res=96"])
    assert (cfg.res, cfg.val_res, cfg.eval_res) == (96, 96, 320)
    assert compose_cfg("train", ["res=96", "val_res=128"]).val_res == 128


def test_crop_script_defaults_to_the_sets_the_presets_train_on():
    cfg = compose_cfg("crop")
    assert list(cfg.datasets) == ["cityscapes", "cocostuff27"] and list(cfg.crop_types) == ["five"]
    assert cfg.crop_ratio == 0.5
    for experiment in ("cityscapes_vits8", "cocostuff27_vits8"):
        source = compose_cfg("train", [f"experiment={experiment}"]).dataset.train_crop_source
        assert (source.crop_type, source.ratio) == ("five", 0.5)


def test_dinov2_preset_resizes_to_the_patch_grid():
    from smooseg.model.backbones import backbone_spec

    cfg = compose_cfg("train", ["experiment=potsdam_dinov2_vitb14"])
    assert cfg.model.fit is None  # the spec's default
    assert backbone_spec(cfg.model.arch, cfg.model.model_type, cfg.model.patch_size).fit == "resize"


def test_demo_preset_is_small_and_cpu():
    cfg = compose_cfg("train", ["experiment=demo"])
    assert cfg.trainer.accelerator == "cpu" and cfg.dataset.train_crop_source is None
    assert cfg.res <= 96 and cfg.max_steps <= 1000 and cfg.num_workers == 0


@pytest.mark.parametrize("group", ["dataset", "model", "trainer", "logger", "experiment"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        overrides = [f"{group}={option}"] + (["dataset.n_classes=5"] if option == "directory" else [])
        cfg = compose_cfg("train", overrides)
        OmegaConf.to_container(cfg, resolve=True)


def test_directory_dataset_needs_n_classes_or_n_clusters():
    cfg = compose_cfg("train", ["dataset=directory"])
    assert cfg.dataset.n_classes is None and cfg.dataset.n_clusters is None
    with pytest.raises(SmoosegError,
                       match="dataset.n_clusters is not set; a directory data set without labels"):
        train_settings(compose_cfg("train", ["dataset=directory"]))


def test_unknown_keys_fail():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["no_such_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["loss.no_such_term=1"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg("eval", ["model_paths=[a.ckpt]", "crf_iters=3"])


def test_eval_config():
    cfg = compose_cfg("eval", ["model_paths=[a.ckpt,b.ckpt]"])
    assert list(cfg.model_paths) == ["a.ckpt", "b.ckpt"]
    assert cfg.flip is True and cfg.crf is True and cfg.dataset is None
    assert OmegaConf.is_missing(compose_cfg("eval"), "model_paths")
    override = compose_cfg("eval", ["model_paths=[a.ckpt]", "dataset=directory", "dataset.dir_name=mine"])
    assert (override.dataset.name, override.dataset.dir_name) == ("directory", "mine")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("eval", ["model_paths=[a.ckpt]", "dataset=mars"])


def test_both_override_styles_compose_alike():
    hydra_style = ["experiment=demo", "max_steps=7", "loss.neg_inter_shift=0.3", "trainer=cpu"]
    ref_style = translate_args(["--experiment", "demo", "--max_steps", "7",
                                "--loss.neg_inter_shift=0.3", "--trainer", "cpu"])
    assert ref_style == hydra_style
    a, b = compose_cfg("train", hydra_style), compose_cfg("train", ref_style)
    assert a == b and a.max_steps == 7 and a.loss.neg_inter_shift == 0.3


def test_entry_points_accept_both_styles(entry_point):
    proc = entry_point("train_segmentation.py", "--experiment", "cityscapes_vits8", "--max_steps", "11",
                      "batch_size=4", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["max_steps"], cfg["batch_size"], cfg["loss"]["neg_inter_shift"]) == (11, 4, 0.5)
    proc = entry_point("eval_segmentation.py", "--model_paths", "[x.ckpt]", "--crf", "false",
                       "flip=false", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model_paths"], cfg["crf"], cfg["flip"]) == (["x.ckpt"], False, False)
    proc = entry_point("train_segmentation.py", "--no_such_key", "3", "--cfg", "job")
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


# ---- unknown keys answered with what was meant

def error_message(name, overrides):
    """config_error_message of composing ``name`` with ``overrides`` (which must fail)."""
    with pytest.raises(ConfigCompositionException) as failed:
        compose_cfg(name, overrides)
    return config_error_message(failed.value)


def hinted_override(message):
    """The override a message tells the user to pass."""
    found = re.search(r"(?:pass|set it whole:) ('[^']*'|[^\s);]+)", message)
    assert found, message
    return found.group(1).strip("'")


EVAL_BASE = ["model_paths=[a.ckpt]"]
# (config, reference key=value, the override it means here, where the value lands, the value)
REFERENCE_RENAMED = [
    ("train", "dataset_name=potsdam", "dataset=potsdam", "dataset.name", "potsdam"),
    ("train", "dino_patch_size=16", "model.patch_size=16", "model.patch_size", 16),
    ("train", "model_type=vit_base", "model.model_type=vit_base", "model.model_type", "vit_base"),
    ("train", "arch=dinov2", "model.arch=dinov2", "model.arch", "dinov2"),
    ("train", "val_freq=200", "val_check_interval=200", "val_check_interval", 200),
    ("train", "checkpoint_freq=300", "val_check_interval=300", "val_check_interval", 300),
    ("train", "crop_type=random", "dataset.train_crop_source.crop_type=random",
     "dataset.train_crop_source.crop_type", "random"),
    ("train", "crop_ratio=0.25", "dataset.train_crop_source.ratio=0.25", "dataset.train_crop_source.ratio",
     0.25),
    ("train", "loader_crop_type=random", "dataset.train_crop=random", "dataset.train_crop", "random"),
    ("train", "lr1=0.001", "optim.lr1=0.001", "optim.lr1", 0.001),
    ("train", "lr2=0.002", "optim.lr2=0.002", "optim.lr2", 0.002),
    ("train", "temperature=0.2", "loss.temperature=0.2", "loss.temperature", 0.2),
    ("train", "alpha=0.99", "loss.ema_alpha=0.99", "loss.ema_alpha", 0.99),
    ("train", "pos_intra_shift=0.1", "loss.pos_intra_shift=0.1", "loss.pos_intra_shift", 0.1),
    ("train", "neg_inter_shift=0.4", "loss.neg_inter_shift=0.4", "loss.neg_inter_shift", 0.4),
    ("train", "pointwise=false", "loss.pointwise=false", "loss.pointwise", False),
    ("train", "dim=32", "model.dim=32", "model.dim", 32),
    ("train", "projection_type=linear", "model.projection_type=linear", "model.projection_type", "linear"),
    ("train", "dropout=false", "model.dropout=false", "model.dropout", False),
    ("train", "dino_feat_type=KK", "model.feat_type=KK", "model.feat_type", "KK"),
    ("train", "n_images=2", "n_log_images=2", "n_log_images", 2),
    ("train", "scalar_log_freq=25", "trainer.log_every_n_steps=25", "trainer.log_every_n_steps", 25),
    ("train", "output_root=runs/x", "output_dir=runs/x", "output_dir", "runs/x"),
    ("train", "run_crf=true", "final_eval.crf=true", "final_eval.crf", True),
    ("eval", "res=224", "eval_res=224", "eval_res", 224),
    ("eval", "run_crf=false", "crf=false", "crf", False),
]
REFERENCE_WITHOUT_COUNTERPART = [
    ("train", "experiment_name=exp1", "output_dir"),
    ("train", "full_name=outputs/", "output_dir"),
    ("train", "log_dir=logs", "<output_dir>/tensorboard"),
    ("train", "azureml_logging=true", "logger=tensorboard"),
    ("train", "n_feats=384", "derived from the backbone"),
    ("eval", "run_picie=true", "PiCIE"),
    ("eval", "run_prediction=true", "always computed"),
    ("eval", "dark_mode=true", "colour map"),
    ("eval", "use_ddp=true", "one process"),
]
REFERENCE_KEPT = [
    ("train", "res=96", "res", 96), ("train", "extra_clusters=3", "extra_clusters", 3),
    ("train", "hist_freq=100", "hist_freq", 100), ("train", "num_workers=8", "num_workers", 8),
    ("train", "max_steps=8000", "max_steps", 8000), ("train", "batch_size=16", "batch_size", 16),
    ("train", "seed=123456", "seed", 123456), ("train", "data_dir=/data", "data_dir", "/data"),
    ("eval", "model_paths=[x.ckpt]", "model_paths", ["x.ckpt"]),
    ("eval", "data_dir=/data", "data_dir", "/data"),
    ("eval", "batch_size=4", "batch_size", 4), ("eval", "num_workers=1", "num_workers", 1),
]


def base(name):
    return EVAL_BASE if name == "eval" else []


@pytest.mark.parametrize("name, override, meant, key, value", REFERENCE_RENAMED,
                         ids=[f"{c[0]}:{c[1].split('=')[0]}" for c in REFERENCE_RENAMED])
def test_reference_key_names_the_native_one(name, override, meant, key, value):
    reference_key = override.split("=")[0]
    message = error_message(name, base(name) + [override])
    assert message.startswith(f"unknown config key '{reference_key}': the reference's {reference_key} is ")
    assert hinted_override(message) == meant, message
    followed = compose_cfg(name, base(name) + [meant])  # following the hint works
    assert OmegaConf.select(followed, key) == value


@pytest.mark.parametrize("name, override, reason", REFERENCE_WITHOUT_COUNTERPART,
                         ids=[f"{c[0]}:{c[1].split('=')[0]}" for c in REFERENCE_WITHOUT_COUNTERPART])
def test_reference_key_without_counterpart_says_why(name, override, reason):
    reference_key = override.split("=")[0]
    message = error_message(name, base(name) + [override])
    assert message.startswith(f"unknown config key '{reference_key}': the reference's {reference_key} has "
                              "no counterpart here (")
    assert reason in message and message.endswith("; remove it")


@pytest.mark.parametrize("name, override, key, value", REFERENCE_KEPT,
                         ids=[f"{c[0]}:{c[1].split('=')[0]}" for c in REFERENCE_KEPT])
def test_reference_key_kept_its_name(name, override, key, value):
    assert OmegaConf.select(compose_cfg(name, base(name) + [override]), key) == value


def test_reference_crop_key_where_the_crop_source_is_null():
    """experiment=demo trains on raw images (dataset.train_crop_source=null): the hint sets it whole."""
    message = error_message("train", ["experiment=demo", "crop_type=five"])
    assert "dataset.train_crop_source is null" in message
    followed = compose_cfg("train", ["experiment=demo", hinted_override(message)])
    assert OmegaConf.to_container(followed.dataset.train_crop_source) == {"crop_type": "five", "ratio": 0.5}
    message = error_message("train", ["experiment=demo", "dataset.train_crop_source.ratio=0.25"])
    followed = compose_cfg("train", ["experiment=demo", hinted_override(message)])
    assert OmegaConf.to_container(followed.dataset.train_crop_source) == {"crop_type": "five", "ratio": 0.25}


def test_training_key_in_the_eval_config():
    message = error_message("eval", EVAL_BASE + ["lr1=0.001"])
    assert "optim.lr1 in train_segmentation.py" in message and message.endswith("remove it")


@pytest.mark.parametrize("name, override, meant", [
    ("train", "loss.temprature=0.2", "loss.temperature=0.2"),
    ("train", "temprature=0.2", "loss.temperature=0.2"),   # the section guessed too
    ("train", "optimm.lr1=0.01", "optim.lr1=0.01"),
    ("train", "max_step=10", "max_steps=10"),
    ("train", "trainer.device=2", "trainer.devices=2"),
    ("eval", "flipp=false", "flip=false"),
])
def test_typo_suggests_the_nearest_key(name, override, meant):
    message = error_message(name, base(name) + [override])
    typed, near = override.split("=")[0], meant.split("=")[0]
    assert message.startswith(f"unknown config key '{typed}'; did you mean {near}?")
    assert hinted_override(message) == meant
    compose_cfg(name, base(name) + [meant])


def test_unknown_key_without_a_near_one():
    message = error_message("train", ["learning_rate=0.1"])
    assert message == ("unknown config key 'learning_rate'; no setting has a similar name (--cfg job prints "
                       "the composed config)")
    message = error_message("train", ["trainer.gpus=2"])  # a Lightning argument the config does not set
    assert hinted_override(message) == "+trainer.gpus=2"
    assert compose_cfg("train", ["+trainer.gpus=2"]).trainer.gpus == 2


def test_sweep_over_an_unknown_key_stops_before_anything_is_written(tmp_path, entry_point):
    """Hydra composes each job only when it launches it; the check runs first, with the whole sweep."""
    proc = entry_point("train_segmentation.py", "-m", "experiment=demo", f"output_dir={tmp_path / 'sweep'}",
                       "seed=0,1", "loss.temprature=0.1,0.2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'loss.temprature'; did you mean loss.temperature? (pass "
        "loss.temperature=0.1,0.2)")
    assert not (tmp_path / "sweep").exists()


def test_sweep_with_ddp_is_refused(tmp_path, entry_point):
    proc = entry_point("train_segmentation.py", "-m", "experiment=demo", "trainer=ddp",
                       f"output_dir={tmp_path / 'sweep'}", "seed=0,1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: a multirun (-m) cannot train with DDP") and "seed=<s> output_dir=" in line
    assert not (tmp_path / "sweep").exists()


def test_final_eval_defaults():
    cfg = compose_cfg("train")
    assert OmegaConf.to_container(cfg.final_eval) == {
        "enabled": True, "crf": False, "crf_backend": "auto", "crf_workers": "auto", "crf_timeout": 120.0,
        "flip": True, "n_images": 0, "batch_size": 8, "precision": "32"}
    hydra = yaml.safe_load((CONFIGS / "train.yaml").read_text())["hydra"]
    # -m: job n trains in <output_dir>/<n>
    assert hydra["sweep"] == {"dir": "${output_dir}", "subdir": "${hydra.job.num}"}
    assert {c["_target_"] for c in hydra["callbacks"].values()} == {"smooseg.cli.CheckSweep",
                                                                    "smooseg.sweep.SweepSummary"}
