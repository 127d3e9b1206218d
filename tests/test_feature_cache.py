"""Feature cache: exact training from cached features, reuse, keys, interrupted builds, refusals."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

import smooseg.train.feature_cache as fc
from conftest import ROOT
from smooseg.data.datasets import build_dataset
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.model.backbone import Backbone, frozen_features
from smooseg.runtime import autocast_dtype
from smooseg.settings import train_settings
from smooseg.train.datamodule import build_datamodule
from smooseg.train.train import build_module, train

RES = 48  # ViT-S/16: a 3x3 patch grid


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("cache_data"), n_train=8, n_val=2,
                                   size=(RES, 2 * RES), seed=3)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Backbone("dino", "vit_small", 16, pretrained=False)


def train_set(data_dir, res=RES, crop="center"):
    return build_dataset("cityscapes", data_dir, "train", res, crop=crop)


def build(data_dir, backbone, cache_dir, res=RES, crop="center", dtype="float32"):
    return fc.open_or_build(train_set(data_dir, res, "center"), backbone, cache_dir, "cityscapes", "train",
                            res, crop, "nearest", dtype=dtype, batch_size=3, progress=False)


def train_config(data_dir, cache_dir, *overrides):
    """Checked, resolved training settings (as train_segmentation.py makes them)."""
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        return train_settings(compose(config_name="train", overrides=[
            "dataset=synthetic", "model=dino_vits16", "model.pretrained=false", f"res={RES}",
            f"eval_res={RES}", "batch_size=4", "num_workers=0", "seed=7", f"data_dir={data_dir}",
            f"cache.dir={cache_dir}", "logger=none", *overrides]))


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_losses(cfg, steps=5):
    """Loss of each of the first ``steps`` steps of a seeded run; also the backbone's call count."""
    pl.seed_everything(int(cfg.seed))
    module = build_module(cfg)
    loader = build_datamodule(cfg, module.net).train_dataloader()
    calls = []
    handle = module.net.backbone.register_forward_hook(lambda *_: calls.append(1))
    recorder = LossRecorder()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(module, loader)
    handle.remove()
    return np.array(recorder.losses), len(calls)


def test_cached_training_gives_the_same_losses(data_dir, tmp_path):
    # 8 images, batch 4, 5 steps: the run crosses an epoch boundary (a second shuffle), and
    # projector dropout is on, so the RNG streams of both runs must stay aligned.
    plain, plain_calls = train_losses(train_config(data_dir, tmp_path, "cache.enabled=false"))
    cached, cached_calls = train_losses(train_config(data_dir, tmp_path, "cache.enabled=true",
                                                     "cache.dtype=float32"))
    half, _ = train_losses(train_config(data_dir, tmp_path, "cache.enabled=true", "cache.dtype=float16"))
    assert plain_calls == 5 and cached_calls == 0  # cached training never runs the backbone
    assert len(plain) == len(cached) == 5
    assert len(set(np.round(plain, 6))) > 1  # the losses move: the comparison is not vacuous
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-5)
    np.testing.assert_allclose(half, plain, rtol=0, atol=5e-3)
    assert np.abs(half - plain).max() > 0  # float16 storage does round the features


def test_cache_holds_backbone_features_labels_and_names(data_dir, backbone, tmp_path, capsys):
    cached = build(data_dir, backbone, tmp_path, dtype="float16")
    out = capsys.readouterr().out
    images = train_set(data_dir)
    assert "feature cache: 8 images × 384×3×3 float16 = " in out and str(cached.path) in out
    assert len(cached) == 8 and cached.feats.shape == (8, 384, 3, 3) and cached.feats.dtype == np.float16
    for i in (0, 5):
        item, ref = cached[i], images[i]
        feats = backbone(ref["img"][None])[0]
        assert item["feats"].dtype == torch.float32 and item["feats"].shape == feats.shape
        torch.testing.assert_close(item["feats"], feats, rtol=2e-3, atol=2e-3)
        assert torch.equal(item["label"], ref["label"]) and (ref["label"] == -1).any()
        assert item["name"] == ref["name"] == images.item_name(i)
    assert cached.labels.dtype == np.uint8  # 27 classes: uint8 with 255 = ignore


def test_cache_is_reused_and_keyed(data_dir, backbone, tmp_path):
    first = build(data_dir, backbone, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    again = build(data_dir, backbone, tmp_path)
    assert again.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamps  # nothing rewritten
    other_res = build(data_dir, backbone, tmp_path, res=32)
    assert other_res.path != first.path and other_res.feats.shape == (8, 384, 2, 2)
    half = build(data_dir, backbone, tmp_path, dtype="float16")
    assert half.path not in (first.path, other_res.path)
    changed = Backbone("dino", "vit_small", 16, pretrained=False)  # other random weights
    assert fc.weights_digest(changed) != fc.weights_digest(backbone)
    assert build(data_dir, changed, tmp_path).path not in (first.path, other_res.path, half.path)
    assert len(list(tmp_path.iterdir())) == 4


def test_cache_key_follows_the_position_embedding_resampling(backbone, monkeypatch):
    """Features cached under another resampling of the position embeddings are not reused."""
    args = ("cityscapes", "train", RES, "center", "nearest", None, backbone)
    now = fc.cache_fields(*args)
    assert now["pos_embed"] == "official-bicubic-scale-factor-offset0.1"
    monkeypatch.setattr(backbone, "pos_embed_policy", "bicubic-size-antialias")
    assert fc.cache_key(fc.cache_fields(*args)) != fc.cache_key(now)


def test_interrupted_build_is_rebuilt(data_dir, backbone, tmp_path, monkeypatch):
    real, calls = fc.frozen_features, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "frozen_features", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build(data_dir, backbone, tmp_path)
    (folder,) = tmp_path.iterdir()
    assert (folder / fc.FEATS_FILE).is_file() and not (folder / fc.META_FILE).exists()
    with pytest.raises(SmoosegError, match="incomplete"):
        fc.CachedFeatureDataset(folder)
    monkeypatch.setattr(fc, "frozen_features", real)
    cached = build(data_dir, backbone, tmp_path)
    assert cached.path == folder and (folder / fc.META_FILE).is_file()
    expected = backbone(torch.stack([train_set(data_dir)[i]["img"] for i in range(8)]))
    torch.testing.assert_close(torch.from_numpy(np.array(cached.feats)), expected, rtol=0, atol=1e-5)


def test_changed_meta_or_image_list_rebuilds(data_dir, backbone, tmp_path):
    cached = build(data_dir, backbone, tmp_path)
    images = train_set(data_dir)
    fields = cached.meta["fields"]
    names = [images.item_name(i) for i in range(len(images))]
    assert fc.is_complete(cached.path, fields, names)
    assert not fc.is_complete(cached.path, fields, names[:-1])
    assert not fc.is_complete(cached.path, dict(fields, res=64), names)


def test_replaced_or_touched_image_rebuilds_the_cache(data_dir, backbone, tmp_path, capsys):
    import shutil

    own = Path(shutil.copytree(data_dir, tmp_path / "data"))
    cached = build(own, backbone, tmp_path / "cache")
    images = train_set(own)
    _, target, _ = images.entries[3]
    _, donor, _ = images.entries[5]
    before = np.array(cached.feats[3])
    stamp = target.stat().st_mtime_ns
    capsys.readouterr()
    assert build(own, backbone, tmp_path / "cache").path == cached.path
    assert "reusing" in capsys.readouterr().out

    shutil.copyfile(donor, target)                    # a replaced image under the same name
    os.utime(target, ns=(stamp + 10**9, stamp + 10**9))  # (a coarse file system may keep the stamp)
    rebuilt = build(own, backbone, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "computed from other files or settings; rebuilding it" in out and "reusing" not in out
    assert rebuilt.path == cached.path and len(list((tmp_path / "cache").iterdir())) == 1  # in place
    expected = backbone(train_set(own)[3]["img"][None])[0]
    torch.testing.assert_close(torch.from_numpy(np.array(rebuilt.feats[3])), expected, rtol=0, atol=1e-5)
    assert not np.allclose(np.array(rebuilt.feats[3]), before)

    later = target.stat().st_mtime_ns + 10**9        # touched: same bytes, newer time
    os.utime(target, ns=(later, later))
    build(own, backbone, tmp_path / "cache")
    assert "rebuilding it" in capsys.readouterr().out
    build(own, backbone, tmp_path / "cache")
    assert "reusing" in capsys.readouterr().out


def test_random_crops_are_refused(data_dir, backbone, tmp_path):
    with pytest.raises(SmoosegError, match="deterministic crops.*train_crop=center or cache.enabled=false"):
        build(data_dir, backbone, tmp_path, crop="random")
    cfg = train_config(data_dir, tmp_path, "cache.enabled=true", "dataset.train_crop=random")
    with pytest.raises(SmoosegError) as err:
        build_datamodule(cfg, build_module(cfg).net)
    assert "\n" not in str(err.value) and "dataset.train_crop=random" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_frozen_features_can_feed_trainable_heads(backbone):
    img = torch.randn(2, 3, 32, 32)
    feats = frozen_features(backbone, img, precision="32")
    assert not feats.is_inference() and not feats.requires_grad and feats.dtype == torch.float32
    torch.testing.assert_close(feats, backbone(img), rtol=0, atol=0)
    head = torch.nn.Conv2d(384, 4, 1)
    head(feats).square().mean().backward()  # autograd may save the features for backward
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        assert frozen_features(backbone, img, precision="32").is_inference()  # no copy needed there


def test_backbone_precision_resolution():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("16-mixed", "cpu") is torch.float16
    with pytest.raises(SmoosegError, match="precision=64 is unknown"):
        autocast_dtype("64", "cpu")


def test_cached_dataset_in_worker_processes(data_dir, backbone, tmp_path):
    cached = build(data_dir, backbone, tmp_path)
    assert cached.feats.shape[0] == 8  # memory-mapped here; workers map it themselves
    batches = list(DataLoader(cached, batch_size=4, num_workers=1))
    torch.testing.assert_close(torch.cat([b["feats"] for b in batches]),
                               torch.from_numpy(np.array(cached.feats)), rtol=0, atol=0)
    assert [n for b in batches for n in b["name"]] == cached.names


def test_not_enough_disk_space_is_refused(data_dir, backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(SmoosegError, match="MB are free.*cache.dir="):
        build(data_dir, backbone, tmp_path)


def test_train_entry_trains_from_the_cache_and_validates_on_images(data_dir, tmp_path, capsys):
    cfg = train_config(data_dir, tmp_path / "cache", "cache.enabled=true", "max_steps=2",
                       "val_check_interval=2", f"output_dir={tmp_path / 'run'}", "trainer=cpu",
                       "trainer.enable_progress_bar=false")
    result = train(cfg)
    assert "feature cache: 8 images × 384×3×3 float16" in capsys.readouterr().out
    assert result["best_mIoU"] is not None and 0 <= result["best_mIoU"] <= 100  # validated on images
    ckpt = torch.load(result["last"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["runtime"]["backbone_precision"] == "32"
    assert len(list((tmp_path / "cache").iterdir())) == 1
