"""Hydra configs: every group option and preset composes, presets hold the published settings (docs/method.md §8), both override styles."""

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import ROOT, run_script
from smooseg.cli import translate_args

CONFIGS = ROOT / "configs"

# docs/method.md §8: dataset, (arch, model_type, patch), res, eval_res, batch, pos_intra_shift, neg_inter_shift, seed
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
    cfg = compose_cfg("train", ["experiment=potsdam_dinov2_vitb14"])
    assert cfg.model.fit == "resize"


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


def test_directory_dataset_needs_n_classes():
    cfg = compose_cfg("train", ["dataset=directory"])
    assert OmegaConf.is_missing(cfg.dataset, "n_classes")


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


def test_entry_points_accept_both_styles():
    proc = run_script("train_segmentation.py", "--experiment", "cityscapes_vits8", "--max_steps", "11",
                      "batch_size=4", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["max_steps"], cfg["batch_size"], cfg["loss"]["neg_inter_shift"]) == (11, 4, 0.5)
    proc = run_script("eval_segmentation.py", "--model_paths", "[x.ckpt]", "--crf", "false",
                      "flip=false", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model_paths"], cfg["crf"], cfg["flip"]) == (["x.ckpt"], False, False)
    proc = run_script("train_segmentation.py", "--no_such_key", "3", "--cfg", "job", check=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
