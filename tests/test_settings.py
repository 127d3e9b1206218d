"""The declared types and ranges of the settings: checked once, before a run, one line per error."""

import pytest
from omegaconf import OmegaConf
from test_crops import run_cli

from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.settings import CROP, TRAIN, check_settings


@pytest.mark.parametrize("key,value,ok", [
    ("batch_size", 1, True), ("batch_size", 0, False), ("batch_size", True, False), ("batch_size", 2.0, False),
    ("loss.temperature", 0.05, True), ("loss.temperature", 0, False), ("loss.temperature", float("nan"), False),
    ("loss.ema_alpha", 1, True), ("loss.ema_alpha", 1.01, False), ("loss.pos_intra_shift", -3.5, True),
    ("optim.lr2", "5e-4", False), ("num_workers", 0, True), ("num_workers", -1, False),
])
def test_rules(key, value, ok):
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    if ok:
        check_settings(cfg, TRAIN)
    else:
        with pytest.raises(SmoosegError, match=f"{key}=.* is not allowed: {key} must be "):
            check_settings(cfg, TRAIN)


def test_null_is_left_alone_and_a_bare_string_becomes_a_list():
    cfg = OmegaConf.create({"eval_res": None, "datasets": "cityscapes", "crop_types": ["five"]})
    check_settings(cfg, {**TRAIN, **CROP})
    assert list(cfg.datasets) == ["cityscapes"] and list(cfg.crop_types) == ["five"]
    with pytest.raises(SmoosegError, match="datasets=3 must be a list"):
        check_settings(OmegaConf.create({"datasets": 3}), CROP)


def test_crop_entry_point_reads_a_bare_data_set_name_as_one(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=2, n_val=1, size=(32, 48))
    out = run_cli([f"data_dir={data}", "datasets=cityscapes", "num_workers=0", "progress=false"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "cityscapes_five_crop_0.5/train: 2 images" in out.stdout
