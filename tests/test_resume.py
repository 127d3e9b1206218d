"""Resuming: a run interrupted mid-epoch and resumed from ``last.ckpt`` ends
exactly where an uninterrupted run with the same seed ends: same parameters, teacher prototypes,
optimiser state and global step. Dropout stays on: the random streams are part of the checkpoint.
"""

import os
import shutil
import signal

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from conftest import train_settings
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.train.callbacks import RandomStateCheckpoint
from smooseg.train.train import train

pytestmark = pytest.mark.slow

# 6 training images, batch 2: 3 steps an epoch. Validation (and last.ckpt) every 2 steps.
OVERRIDES = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
             "batch_size=2", "num_workers=0", "logger=none", "val_check_interval=2", "seed=0",
             "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]


class StepCounter(Callback):
    """Records the global step training starts at and how many batches it trains."""

    def __init__(self):
        self.start, self.batches = None, 0

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


def run(data, out, *extra, callbacks=()):
    cfg = train_settings(OVERRIDES + [f"data_dir={data}", f"output_dir={out}", *extra])
    train(cfg, callbacks=list(callbacks))
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(opt_b["state"][index][name], value, rtol=1e-6, atol=1e-7)


def differs(a, b):
    return any(not torch.allclose(a["state_dict"][k], v, rtol=1e-6, atol=1e-7)
               for k, v in b["state_dict"].items())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("data"), n_train=6, n_val=2,
                                   size=(32, 64), seed=0)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(data, tmp_path):
    straight = run(data, tmp_path / "a", "max_steps=6")

    # "killed" after step 4: mid-way through the second epoch, right after last.ckpt was written
    first = run(data, tmp_path / "b", "max_steps=4")
    assert first["global_step"] == 4
    rng_key = next(k for k in first["callbacks"] if "RandomStateCheckpoint" in k)
    no_rng = tmp_path / "no_rng" / "checkpoints" / "last.ckpt"
    no_rng.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "b" / "checkpoints" / "last.ckpt", no_rng)

    counter = StepCounter()
    resumed = run(data, tmp_path / "b", "max_steps=6", "ckpt_path=last", callbacks=[counter])
    assert counter.start == 4 and counter.batches == 2  # continued, not restarted
    assert_same_training_state(straight, resumed)
    teacher = resumed["state_dict"]["net.predictor.teacher"]
    student = resumed["state_dict"]["net.predictor.student"]
    assert not torch.allclose(teacher, first["state_dict"]["net.predictor.teacher"])  # the EMA went on
    assert not torch.allclose(teacher, student)

    # Control: the same resume without the saved random streams (an older checkpoint) draws other
    # dropout masks and pairings, so the comparison above is sensitive to them.
    ckpt = torch.load(no_rng, map_location="cpu", weights_only=True)
    del ckpt["callbacks"][rng_key]
    torch.save(ckpt, no_rng)
    other = run(data, tmp_path / "no_rng", "max_steps=6", f"ckpt_path={no_rng}")
    assert other["global_step"] == 6
    assert differs(other, straight)


def test_random_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    import numpy as np

    callback = RandomStateCheckpoint()
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = callback.state_dict()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    callback.on_train_start(trainer=None, pl_module=None)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert random.random() == expected[2]


def _crop_sums(dataset, sampler, workers):
    """Per-image sums of the crops one epoch of ``sampler`` gives, keyed by image name."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
    return {name: float(img.sum()) for batch in loader
            for name, img in zip(batch["name"], batch["img"], strict=True)}


def test_random_crops_change_per_epoch_and_repeat_after_resume(tmp_path):
    from smooseg.data.datasets import build_dataset
    from smooseg.train.datamodule import EpochSampler

    write_cityscapes_layout(tmp_path, n_train=4, n_val=1, size=(32, 64))
    dataset = build_dataset("cityscapes", tmp_path, "train", res=16, crop="random", seed=5)
    assert dataset.epoch_items
    sampler = EpochSampler(dataset, seed=5)
    epoch0 = _crop_sums(dataset, sampler, workers=1)
    sampler.set_epoch(1)
    epoch1 = _crop_sums(dataset, sampler, workers=1)
    assert epoch0.keys() == epoch1.keys() and len(epoch0) == 4
    assert epoch0 != epoch1  # fresh crops every epoch, also with worker processes
    # a resumed sampler at epoch 1 (no workers this time) reproduces that epoch's crops exactly
    assert _crop_sums(dataset, EpochSampler(dataset, seed=5, epoch=1), workers=0) == epoch1
    centre = build_dataset("cityscapes", tmp_path, "train", res=16, crop="center", seed=5)
    assert not centre.epoch_items and all(isinstance(i, int) for i in EpochSampler(centre, seed=5))


class SigtermAt(Callback):
    """Sends this process SIGTERM (what a scheduler sends) while the batch that makes global step
    ``step`` is being trained."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])  # 3 steps an epoch: every position of epochs 0 and 1
def test_resume_after_sigterm_at_each_position_in_the_epoch_is_exact(data, tmp_path, step):
    straight = run(data, tmp_path / "a", "max_steps=6")
    with pytest.raises(SystemExit) as stopped:
        run(data, tmp_path / "b", "max_steps=6", callbacks=[SigtermAt(step)])
    assert stopped.value.code == 143
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == step
    counter = StepCounter()
    resumed = run(data, tmp_path / "b", "max_steps=6", "ckpt_path=last", callbacks=[counter])
    assert counter.start == step and counter.batches == 6 - step
    assert_same_training_state(straight, resumed)
