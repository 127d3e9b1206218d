"""Checkpoint loading: native round trip, reference layout, safe unpickling, clear errors."""

import json
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_script, train_config
from smooseg.errors import SmoosegError
from smooseg.model import backbone
from smooseg.model.checkpoints import load_net, read_checkpoint
from smooseg.train.datamodule import build_datasets

# Native module name -> reference release name (docs/method.md section 9).
TO_REFERENCE = (
    ("net.backbone.model.", "net.model."),
    ("net.projector.linear.", "projection.cluster1.0."),
    ("net.projector.nonlinear.", "projection.cluster2."),
    ("net.predictor.student", "prediction.local_clusters"),
    ("net.predictor.teacher", "prediction.global_clusters"),
)


def to_reference_key(key):
    for ours, theirs in TO_REFERENCE:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise AssertionError(f"unmapped key {key}")


def flat(hp):
    """The grouped hyper-parameters of a native checkpoint as one flat dict."""
    return {**hp["net"], **hp["loss"], **hp["optim"], "dataset_name": hp["data"]["name"],
            "n_classes": hp["data"]["n_classes"],
            "extra_clusters": hp["net"]["n_clusters"] - hp["data"]["n_classes"]}


def reference_cfg(hp):
    """A training cfg as the reference release stores it (OmegaConf DictConfig)."""
    hp = flat(hp) if "net" in hp else hp
    return OmegaConf.create({
        "output_root": "outputs/", "data_dir": "data/", "experiment_name": "exp1",
        "num_workers": 8, "max_steps": 3000, "batch_size": 32, "dataset_name": hp["dataset_name"],
        "crop_type": "five", "crop_ratio": 0.5, "res": 224, "loader_crop_type": "center",
        "extra_clusters": hp["extra_clusters"], "model_type": hp["model_type"], "arch": hp["arch"],
        "dino_feat_type": hp["feat_type"], "projection_type": hp["projection_type"],
        "dino_patch_size": hp["patch_size"], "n_feats": 384, "dim": hp["dim"], "run_crf": False,
        "lr1": hp["lr1"], "lr2": hp["lr2"], "dropout": hp["dropout"],
        "temperature": hp["temperature"], "alpha": hp["ema_alpha"], "pointwise": hp["pointwise"],
        "seed": 0, "neg_inter_shift": hp["neg_inter_shift"], "pos_intra_shift": hp["pos_intra_shift"],
        "n_images": 6, "scalar_log_freq": 10, "checkpoint_freq": 400, "val_freq": 400,
        "hist_freq": 100, "full_name": "outputs/", "azureml_logging": True,
    })


@pytest.fixture(scope="module")
def native(trained_run):
    return read_checkpoint(trained_run["last"])


@pytest.fixture(scope="module")
def reference_file(native, tmp_path_factory):
    """The trained model written in the reference release's checkpoint layout."""
    hp = native["hyper_parameters"]
    path = tmp_path_factory.mktemp("reference") / "cityscapes_vit_small.ckpt"
    torch.save({
        "epoch": 3, "global_step": 60, "pytorch-lightning_version": "2.0.4",
        "state_dict": {to_reference_key(k): v for k, v in native["state_dict"].items()},
        "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"n_classes": hp["data"]["n_classes"], "cfg": reference_cfg(hp)},
    }, path)
    return path


@pytest.fixture(scope="module")
def val_batch(trained_run):
    _, val_set = build_datasets(train_config(trained_run["overrides"]))
    return torch.stack([val_set[i]["img"] for i in range(4)])


def test_native_round_trip(trained_run, native, val_batch, monkeypatch):
    # the file itself needs no allow-listing: plain weights-only unpickling reads it
    torch.load(trained_run["last"], map_location="cpu", weights_only=True)

    def no_weights(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not need the DINO weights file")

    monkeypatch.setattr(backbone, "resolve_weights", no_weights)
    net, hparams = load_net(trained_run["last"])
    assert not net.training and hparams["data"]["name"] == "cityscapes"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    assert state.keys() == native["state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in native["state_dict"].items())
    assert not any(p.requires_grad for p in net.backbone.parameters())
    with torch.no_grad():
        assert net(val_batch).shape == (4, 27, 64, 64)


def test_reference_layout_gives_identical_predictions(trained_run, reference_file, val_batch):
    with pytest.raises(pickle.UnpicklingError):  # what PyTorch >= 2.6 does with such files by default
        torch.load(reference_file, map_location="cpu")
    (ours, ours_hp), (theirs, theirs_hp) = load_net(trained_run["last"]), load_net(reference_file)
    assert theirs_hp["data"]["name"] == "cityscapes" and theirs_hp["data"]["n_classes"] == 27
    assert theirs_hp["loss"]["pos_intra_shift"] == ours_hp["loss"]["pos_intra_shift"]
    assert theirs_hp["loss"]["ema_alpha"] == ours_hp["loss"]["ema_alpha"]
    with torch.no_grad():
        for flip in (False, True):
            expected = ours(val_batch, flip=flip)
            assert torch.equal(theirs(val_batch, flip=flip), expected)


def test_reference_checkpoint_evaluates_like_native(trained_run, reference_file, tmp_path):
    run_script("eval_segmentation.py", f"model_paths=[{trained_run['last']},{reference_file}]",
               f"data_dir={trained_run['data_dir']}", "eval_res=64", "crf=false", "n_images=1",
               "num_workers=0", f"output_dir={tmp_path}")
    ours = json.loads(next(tmp_path.glob("last-*/metrics.json")).read_text())
    theirs = json.loads(next(tmp_path.glob(f"{reference_file.stem}-*/metrics.json")).read_text())
    for key in ("mIoU", "Accuracy", "per_class_iou", "assignment"):
        assert theirs[key] == ours[key]


class Payload:
    """Unpickling this creates ``marker`` (stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_code_in_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"x": Payload(str(marker))}},
               path)
    with pytest.raises(SmoosegError, match="refused.*open"):
        load_net(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    a_list = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], a_list)
    no_hparams = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {"projector.linear.weight": torch.zeros(1)}}, no_hparams)
    for path in (text, empty, a_list, no_hparams):
        with pytest.raises(SmoosegError, match="is not a SmooSeg checkpoint") as err:
            load_net(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(SmoosegError, match="not found"):
        load_net(tmp_path / "absent.ckpt")


def test_architecture_mismatch_names_key_and_shapes(native, tmp_path):
    hp = native["hyper_parameters"]
    broken = dict(native, hyper_parameters=dict(hp, net=dict(hp["net"], dim=32)))
    path = tmp_path / "dim32.ckpt"
    torch.save(broken, path)
    shapes = r"projector\.linear\.weight.*\(64, 384, 1, 1\) in the file.*\(32, 384, 1, 1\) in the model"
    with pytest.raises(SmoosegError, match=shapes):
        load_net(path)
    truncated = dict(native, state_dict={k: v for k, v in native["state_dict"].items()
                                         if k != "net.predictor.teacher"})
    torch.save(truncated, path)
    with pytest.raises(SmoosegError, match="missing predictor.teacher"):
        load_net(path)


def test_reference_backbone_mismatch(native, tmp_path):
    hp = dict(flat(native["hyper_parameters"]), model_type="vit_base")
    path = tmp_path / "ref_base.ckpt"
    torch.save({"state_dict": {to_reference_key(k): v for k, v in native["state_dict"].items()},
                "hyper_parameters": {"n_classes": 27, "cfg": reference_cfg(hp)}}, path)
    with pytest.raises(SmoosegError, match="does not fit"):
        load_net(path)
