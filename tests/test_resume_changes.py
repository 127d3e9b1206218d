"""Resuming with changed settings (ckpt_path=last): a change that alters the run is refused, naming
each changed key, before anything is written; with resume_changes=true it is applied truly (the
optimiser's learning rates too) and every segment's settings are kept."""

import pytest
import torch
import yaml

from conftest import train_settings
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.train.train import changed_settings, train

pytestmark = pytest.mark.slow

OVERRIDES = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
             "batch_size=2", "num_workers=0", "logger=none", "val_check_interval=2", "seed=0",
             "final_eval.enabled=false", "trainer.enable_progress_bar=false",
             "+trainer.enable_model_summary=false"]


def test_changed_settings_names_what_alters_the_run():
    before = train_settings(OVERRIDES)
    after = train_settings(OVERRIDES + ["optim.lr1=2e-4", "res=48", "max_steps=9", "num_workers=1",
                                        "loss.temperature=0.2", "final_eval.crf=true"])
    assert changed_settings(before, after) == {"loss.temperature": (0.1, 0.2), "optim.lr1": (1e-4, 2e-4),
                                               "res": (32, 48), "val_res": (32, 48)}  # val_res follows res
    assert changed_settings(before, train_settings(OVERRIDES)) == {}


def test_resume_with_a_changed_learning_rate(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=6, n_val=2, size=(32, 64), seed=0)
    out = tmp_path / "run"
    common = OVERRIDES + [f"data_dir={data}", f"output_dir={out}"]
    train(train_settings(common + ["max_steps=2"]))
    first = (out / "config.yaml").read_text()
    last = out / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns

    with pytest.raises(SmoosegError) as refused:
        train(train_settings(common + ["max_steps=4", "ckpt_path=last", "optim.lr1=3e-4", "batch_size=3"]))
    line = str(refused.value)
    assert "\n" not in line and "batch_size 2 -> 3" in line and "optim.lr1 0.0001 -> 0.0003" in line
    assert "resume_changes=true" in line
    assert last.stat().st_mtime_ns == stamp and sorted(p.name for p in out.glob("config*")) == ["config.yaml"]

    train(train_settings(common + ["max_steps=4", "ckpt_path=last", "optim.lr1=3e-4", "resume_changes=true"]))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [3e-4, 5e-4]
    assert ckpt["hyper_parameters"]["optim"]["lr1"] == 3e-4
    assert (out / "config.yaml").read_text() == first  # the first segment's settings are kept
    second = yaml.safe_load((out / "config.resume-1.yaml").read_text())
    assert second["optim"]["lr1"] == 3e-4 and second["ckpt_path"] == "last"

    train(train_settings(common + ["max_steps=5", "ckpt_path=last", "optim.lr1=3e-4"]))  # as the last segment
    assert sorted(p.name for p in out.glob("config*")) == ["config.resume-1.yaml", "config.resume-2.yaml",
                                                           "config.yaml"]
