"""Two-process DDP on CPU (gloo) through Lightning.

A small script composes the training config and calls ``smooseg.train.train.train`` with a callback
that makes every process save what it ends with; Lightning's DDP launcher starts the second process
by re-running the script. Checked: both processes end with identical projector, student and
teacher prototypes; the training loss log is the mean over processes; validation counts every one
of the 5 validation images exactly once (no padding duplicates) and its metrics equal a
single-process validation of the saved checkpoint on the same data; the final evaluation runs once,
on rank zero.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT, train_config
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.eval.metrics import ClusterMetrics
from smooseg.model.checkpoints import load_net
from smooseg.train.datamodule import build_datasets

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    """Train with the given overrides; every process saves its final state to <folder>/rank<r>.pt."""
    import sys
    from pathlib import Path

    import torch
    from hydra import compose, initialize_config_dir
    from pytorch_lightning.callbacks import Callback

    from smooseg.settings import train_settings
    from smooseg.train.train import train


    class SaveRankState(Callback):
        def __init__(self, folder):
            self.folder = Path(folder)
            self.local_losses = []

        def on_train_start(self, trainer, module):
            self.teacher_start = module.net.predictor.teacher.detach().clone()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.local_losses.append(float(outputs["loss"]))

        def on_validation_epoch_end(self, trainer, module):
            # callback hooks run before the module's: the metric holds this process's own counts
            self.confusion = module.val_metrics.confusion.detach().clone()

        def on_train_end(self, trainer, module):
            torch.save({
                "world_size": trainer.world_size,
                "state": {k: v.detach().clone() for k, v in module.state_dict().items()
                          if not k.startswith("net.backbone.")},
                "teacher_start": self.teacher_start,
                "local_losses": self.local_losses,
                "confusion": self.confusion,
                "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            }, self.folder / f"rank{trainer.global_rank}.pt")


    config_dir, folder, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(train_settings(cfg), callbacks=[SaveRankState(folder)])
''')


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """8 training images (4 a process, 2 steps an epoch), 5 validation images (3 + 2), 4 steps."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_cityscapes_layout(root / "data", n_train=8, n_val=5, size=(32, 64), seed=0)
    overrides = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32",
                 "eval_res=32", "batch_size=2", "num_workers=0", "logger=none", "max_steps=4",
                 "val_check_interval=2", "seed=0", f"data_dir={data}", f"output_dir={root / 'out'}",
                 "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                 "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    script = root / "train_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "smooseg" / "configs"), str(root),
                           *overrides],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"DDP run exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"ranks": ranks, "overrides": overrides, "last": root / "out" / "checkpoints" / "last.ckpt",
            "out": root / "out", "stdout": proc.stdout}


def test_final_evaluation_runs_once_on_rank_zero(ddp_run):
    """Both processes' output is captured (the second inherits the first's stdout): one final
    evaluation, of every validation image, after both finished training."""
    assert ddp_run["stdout"].count("final evaluation: the val split at 32x32") == 1, ddp_run["stdout"][-3000:]
    metrics = json.loads((ddp_run["out"] / "final_eval" / "metrics.json").read_text())
    assert metrics["n_evaluated"] == 5
    assert metrics["checkpoint"].startswith(str(ddp_run["out"] / "checkpoints"))


def test_processes_end_identical(ddp_run):
    r0, r1 = ddp_run["ranks"]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["state"].keys() == r1["state"].keys()
    assert {"net.predictor.student", "net.predictor.teacher",
            "net.projector.linear.weight"} <= r0["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # the EMA did move the teacher (identically on both processes)
    assert not torch.allclose(r0["state"]["net.predictor.teacher"], r0["teacher_start"])
    assert torch.equal(r0["teacher_start"], r1["teacher_start"])
    # the saved checkpoint is that state
    saved = torch.load(ddp_run["last"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    for key, value in r0["state"].items():
        assert torch.equal(saved["state_dict"][key], value), key


def test_training_loss_log_is_synchronised(ddp_run):
    r0, r1 = ddp_run["ranks"]
    assert len(r0["local_losses"]) == len(r1["local_losses"]) == 4
    assert r0["local_losses"][-1] != pytest.approx(r1["local_losses"][-1])  # different data
    mean = (r0["local_losses"][-1] + r1["local_losses"][-1]) / 2
    assert r0["logged"]["train/loss"] == pytest.approx(mean, rel=1e-6)
    assert r1["logged"]["train/loss"] == pytest.approx(mean, rel=1e-6)


def test_validation_counts_each_image_once_and_matches_single_process(ddp_run):
    r0, r1 = ddp_run["ranks"]
    _, val_set = build_datasets(train_config(ddp_run["overrides"]))
    assert len(val_set) == 5
    net, _ = load_net(ddp_run["last"])
    single = ClusterMetrics(27, 27)
    with torch.no_grad():
        for batch in DataLoader(val_set, batch_size=2):
            preds = net(batch["img"], batch["label"].shape[-2:]).argmax(1)
            single.update(preds, batch["label"])
    labelled = [int((val_set[i]["label"] >= 0).sum()) for i in range(5)]
    # process r took images r, r + 2, ...: 3 and 2 images, none twice
    assert int(r0["confusion"].sum()) == sum(labelled[0::2])
    assert int(r1["confusion"].sum()) == sum(labelled[1::2])
    assert torch.equal(r0["confusion"] + r1["confusion"], single.confusion)
    expected = single.compute()
    for rank in (r0, r1):
        assert rank["logged"]["val/cluster/mIoU"] == pytest.approx(expected["mIoU"], abs=1e-4)
        assert rank["logged"]["val/cluster/Accuracy"] == pytest.approx(expected["Accuracy"], abs=1e-4)
