"""What a training run reads: the published training sets, the validation resolution and the
precision the frozen backbone runs in."""

import pytest
from test_data_readers import make_potsdam

from conftest import train_settings
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.settings import backbone_precision
from smooseg.train.datamodule import build_datasets


def test_potsdam_trains_on_labelled_train_only_unless_asked(tmp_path):
    make_potsdam(tmp_path, {"labelled_train": ["t0", "t1"], "unlabelled_train": ["u0", "u1", "u2"],
                            "labelled_test": ["v0"]})
    common = ["experiment=potsdam_vitb8", f"data_dir={tmp_path}", "res=8"]
    train, val = build_datasets(train_settings(common))
    assert sorted(train.item_name(i) for i in range(len(train))) == ["t0", "t1"]
    assert [val.item_name(i) for i in range(len(val))] == ["v0"]
    union, _ = build_datasets(train_settings(common + ["dataset.train_unlabelled=true"]))
    assert len(union) == 5
    with pytest.raises(SmoosegError, match="train_unlabelled=true is for potsdam only"):
        build_datasets(train_settings([f"data_dir={tmp_path}", "dataset.train_unlabelled=true"]))


@pytest.fixture(scope="module")
def cityscapes_dir(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("cs"), n_train=2, n_val=2, size=(64, 128))


def test_missing_five_crop_set_names_the_folder_and_the_command(cityscapes_dir):
    cfg = train_settings(["experiment=cityscapes_vits8", f"data_dir={cityscapes_dir}"])
    with pytest.raises(SmoosegError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert f"{cityscapes_dir}/cropped/cityscapes_five_crop_0.5 does not exist" in message
    assert (f"`python crop_datasets.py data_dir={cityscapes_dir} datasets=[cityscapes] crop_types=[five] "
            "crop_ratio=0.5`") in message
    assert "dataset.train_crop_source=null" in message and "\n" not in message


def test_raw_images_when_asked_and_validation_at_the_training_resolution(cityscapes_dir):
    cfg = train_settings(["experiment=cityscapes_vits8", f"data_dir={cityscapes_dir}", "res=32",
                        "dataset.train_crop_source=null"])
    train, val = build_datasets(cfg)
    assert len(train) == 2 and len(val) == 2
    assert tuple(train[0]["img"].shape[-2:]) == (32, 32)
    assert tuple(val[0]["img"].shape[-2:]) == (32, 32)  # val_res follows res, not eval_res (320)
    _, val = build_datasets(train_settings(["experiment=cityscapes_vits8", f"data_dir={cityscapes_dir}",
                                          "res=32", "val_res=48", "dataset.train_crop_source=null"]))
    assert tuple(val[0]["img"].shape[-2:]) == (48, 48)


@pytest.mark.parametrize("requested,trainer,expected", [
    ("auto", "32-true", "32"),
    ("auto", "16-mixed", "16"),    # the reference's precision=16
    ("auto", "bf16-mixed", "bf16"),
    ("32", "16-mixed", "32"),
    ("bf16", "32-true", "bf16"),
])
def test_backbone_precision_follows_the_trainer_unless_asked(requested, trainer, expected):
    assert backbone_precision(requested, trainer) == expected


def test_cpu_trainer_resolves_the_backbone_to_fp32():
    assert train_settings(["trainer=cpu"]).perf.backbone_precision == "32"
