"""Linear probe (supervised diagnostic): identity metrics, no effect on the unsupervised model,
it learns, and checkpoints with and without it evaluate."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from conftest import ROOT, make_module
from smooseg.data.datasets import DatasetInfo
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import evaluate, run_eval
from smooseg.eval.metrics import ClusterMetrics
from smooseg.model.checkpoints import load_net, read_checkpoint
from smooseg.settings import eval_settings, train_settings
from smooseg.train.datamodule import build_datamodule, build_datasets
from smooseg.train.train import build_module, train

N_CLASSES = 3


TO_SETTINGS = {"train": train_settings, "eval": eval_settings}


def compose_cfg(name, overrides):
    """The checked, resolved settings of smooseg/configs/<name>.yaml with ``overrides``."""
    return TO_SETTINGS[name](compose_config(name, overrides))


def compose_config(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# ---- identity matching ------------------------------------------------------------------------


def test_identity_matching_by_hand():
    # 3 clusters × 3 classes; Hungarian would map class0<-cluster1, class1<-cluster0
    preds = torch.tensor([1, 1, 1, 0, 0, 2, 2, 0, 1])
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0, -1])
    identity = ClusterMetrics(3, 3, match="identity")
    identity.update(preds, target)
    got = identity.compute()
    assert got["assignment"].tolist() == [0, 1, 2]
    # class0: tp 0 (pred 0 on a class-0 pixel: 1, at index 7) -> tp 1, fp 2 (indices 3,4), fn 3
    # class1: tp 0, fp 0, fn 2 ; class2: tp 2, fp 0, fn 0 ; counted pixels 8 (index 8 ignored)
    np.testing.assert_allclose(got["iou"].numpy(), [100 / 6, 0.0, 100.0])
    assert got["Accuracy"] == pytest.approx(3 / 8 * 100)
    hungarian = ClusterMetrics(3, 3)
    hungarian.update(preds, target)
    assert hungarian.compute()["assignment"].tolist() == [1, 0, 2]
    with pytest.raises(SmoosegError, match="match='best'"):
        ClusterMetrics(3, 3, match="best")


# ---- the probe leaves the unsupervised model alone --------------------------------------------


def tiny_batches(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(size, size, dtype=torch.long)
    label[:, size // 3:] = 1
    label[:, 2 * size // 3:] = 2
    label[:3] = -1
    return [{"img": torch.randn(3, size, size, generator=g), "label": label.clone()} for _ in range(n)]


class GradRecorder(Callback):
    """Gradients of the projector, the student prototypes and the probe at every optimiser step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = {k: p.grad.detach().clone() for k, p in pl_module.named_parameters() if p.grad is not None}
        self.grads.append(named)


def fit_tiny(probe, steps=3, **module_kwargs):
    pl.seed_everything(0)
    module = make_module(n_classes=N_CLASSES, dataset_name="directory", model_type="vit_small",
                         patch_size=16, dim=16, linear_probe=probe, **module_kwargs)
    recorder = GradRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[recorder])
    trainer.fit(module, DataLoader(tiny_batches(), batch_size=4, shuffle=True))
    return module, recorder.grads, trainer


def test_probe_does_not_change_the_unsupervised_gradients_or_training():
    off, grads_off, _ = fit_tiny(probe=False)
    on, grads_on, trainer = fit_tiny(probe=True)
    assert off.net.linear_probe is None and on.net.linear_probe is not None
    assert len(grads_off) == len(grads_on) == 3
    for g_off, g_on in zip(grads_off, grads_on, strict=True):
        unsupervised = [k for k in g_on if not k.startswith("net.linear_probe.")]
        assert sorted(unsupervised) == sorted(g_off)  # projector + student prototypes only
        assert any(k.startswith("net.projector.") for k in g_off) and "net.predictor.student" in g_off
        for key in g_off:
            assert torch.equal(g_on[key], g_off[key]), key  # bit-identical (dropout on, same draws)
        assert g_on["net.linear_probe.weight"].abs().sum() > 0  # the probe itself does learn
    # after three Adam steps + EMA the unsupervised state is still identical
    state_off = off.state_dict()
    for key, value in on.state_dict().items():
        if not key.startswith("net.linear_probe."):
            assert torch.equal(value, state_off[key]), key
    optimiser = trainer.optimizers[0]
    assert [g["lr"] for g in optimiser.param_groups] == [1e-4, 5e-4, 5e-3]
    assert float(trainer.logged_metrics["train/linear"]) > 0


def test_probe_is_off_by_default_and_not_in_the_state():
    module = make_module(n_classes=N_CLASSES, model_type="vit_small", patch_size=16, dim=16)
    assert module.net.linear_probe is None and module.val_linear_metrics is None
    assert not any("linear_probe" in k for k in module.state_dict())
    assert len(module.configure_optimizers().param_groups) == 2
    cfg = compose_cfg("train", ["experiment=demo"])
    assert cfg.linear_probe is False and cfg.optim.linear_lr == 5e-3 and cfg.hist_freq == 0


def test_probe_loss_is_cross_entropy_of_upsampled_logits():
    torch.manual_seed(0)
    module = make_module(n_classes=N_CLASSES, model_type="vit_small", patch_size=16, dim=4, linear_probe=True)
    code = torch.randn(2, 4, 2, 2, requires_grad=True)
    label = torch.randint(-1, N_CLASSES, (2, 4, 4))
    label[0] = -1  # an unlabelled image counts for nothing
    loss = module.linear_probe_loss(code, label)
    w, b = module.net.linear_probe.weight[:, :, 0, 0], module.net.linear_probe.bias
    logits = torch.nn.functional.interpolate(torch.einsum("kd,bdhw->bkhw", w, code) + b[:, None, None],
                                             size=(4, 4), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(logits, label, ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert code.grad is None  # detached code
    assert module.linear_probe_loss(code, torch.full((2, 4, 4), -1)).item() == 0.0


# ---- a tiny trained checkpoint with a probe ---------------------------------------------------


class ValRecorder(Callback):
    def __init__(self):
        self.metrics = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    data_dir = write_cityscapes_layout(tmp_path_factory.mktemp("probe_data"), n_train=8, n_val=4,
                                       size=(64, 128), seed=0)
    output_dir = tmp_path_factory.mktemp("probe_train")
    overrides = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", f"data_dir={data_dir}",
                 f"output_dir={output_dir}", "max_steps=30", "val_check_interval=30", "batch_size=4",
                 "linear_probe=true", "logger=none", "trainer.enable_progress_bar=false"]
    cfg = compose_cfg("train", overrides)
    recorder = ValRecorder()
    result = train(cfg, callbacks=[recorder])
    return {"cfg": cfg, "data_dir": data_dir, "last": result["last"], "val": recorder.metrics}


def test_probe_learns_and_is_validated(probe_run):
    cfg = probe_run["cfg"]
    (val,) = probe_run["val"]
    for key in ("val/linear/mIoU", "val/linear/Accuracy", "val/cluster/mIoU"):
        assert 0.0 <= val[key] <= 100.0, key
    pl.seed_everything(int(cfg.seed), workers=True)
    untrained = build_module(cfg)  # same initial weights as the run (probe included)
    trained, hparams = load_net(probe_run["last"])
    _, val_set = build_datasets(cfg)
    loader = DataLoader(val_set, batch_size=4)
    before = evaluate(untrained.net, loader, untrained.data, flip=False, show_progress=False)[0]["linear"]
    after = evaluate(trained, loader, DatasetInfo(**hparams["data"]), flip=False,
                     show_progress=False)[0]["linear"]
    assert after["Accuracy"] > before["Accuracy"] + 30.0, (before["Accuracy"], after["Accuracy"])
    # validation during training = the same probe prediction without flip
    assert after["Accuracy"] == pytest.approx(val["val/linear/Accuracy"], abs=1e-3)
    assert after["mIoU"] == pytest.approx(val["val/linear/mIoU"], abs=1e-3)


def test_probe_checkpoint_round_trip_and_eval(probe_run, tmp_path, capsys):
    ckpt = read_checkpoint(probe_run["last"])
    hp = ckpt["hyper_parameters"]
    assert hp["net"]["linear_probe_classes"] == 27
    module, _ = load_net(probe_run["last"])
    torch.testing.assert_close(module.linear_probe.weight, ckpt["state_dict"]["net.linear_probe.weight"])

    # legacy file: this package's earlier layout (flat hyper-parameters, keys without "net."),
    # written before this feature: no probe, no diagnostics hyper-parameters
    flat = {**{k: v for k, v in hp["net"].items() if k not in ("n_clusters", "linear_probe_classes")},
            **hp["loss"], "lr1": hp["optim"]["lr1"], "lr2": hp["optim"]["lr2"], "n_classes": 27,
            "dataset_name": hp["data"]["name"], "eval_res": hp["data"]["eval_res"]}
    legacy = dict(ckpt, state_dict={k[len("net."):]: v for k, v in ckpt["state_dict"].items()
                                    if not k.startswith("net.linear_probe.")},
                  hyper_parameters=flat)
    legacy_path = tmp_path / "legacy.ckpt"
    torch.save(legacy, legacy_path)

    common = [f"data_dir={probe_run['data_dir']}", "crf=false", "n_images=0", "batch_size=4",
              "num_workers=0", f"output_dir={tmp_path / 'eval'}"]
    with_probe, without = run_eval(compose_cfg("eval", [f"model_paths=[{probe_run['last']},{legacy_path}]",
                                                        *common]))
    printed = capsys.readouterr().out
    assert "linear" not in without and printed.count("linear probe (supervised, no CRF): mIoU") == 1
    saved = json.loads(next((tmp_path / "eval").glob("last-*/metrics.json")).read_text())
    assert saved["linear"] == with_probe["linear"]
    assert sorted(saved["linear"]["assignment"].values()) == list(range(27))
    # the unsupervised numbers do not depend on the probe
    assert without["mIoU"] == pytest.approx(with_probe["mIoU"])
    assert without["Accuracy"] == pytest.approx(with_probe["Accuracy"])

    # linear Accuracy by hand: flip-averaged code, probe logits upsampled, argmax == label
    _, val_set = build_datasets(probe_run["cfg"])
    hits = total = 0
    with torch.no_grad():
        for batch in DataLoader(val_set, batch_size=4):
            code = module.predict_code(batch["img"], flip=True)
            logits = torch.nn.functional.interpolate(module.linear_probe(code), size=(64, 64),
                                                     mode="bilinear", align_corners=False)
            assert batch["label"].shape[-2:] == (64, 64)
            keep = batch["label"] >= 0
            hits += int((logits.argmax(1) == batch["label"])[keep].sum())
            total += int(keep.sum())
    assert with_probe["linear"]["Accuracy"] == pytest.approx(100 * hits / total, abs=1e-6)


def test_probe_needs_labelled_training_images(tmp_path):
    data_dir = write_directory_layout(tmp_path, name="mydata", n_train=4, n_val=2, size=(32, 32),
                                      with_labels=False)
    cfg = compose_cfg("train", ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mydata",
                                f"data_dir={data_dir}", "batch_size=2", "res=32", "eval_res=32",
                                "linear_probe=true"])
    with pytest.raises(SmoosegError, match="linear_probe=true needs labelled training images"):
        build_datamodule(cfg)
