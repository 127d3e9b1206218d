"""SmooSegModule: training step and logging, EMA once per optimiser step, prediction, evaluation."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

import conftest
from smooseg.eval.crf_pool import CRFPool
from smooseg.eval.evaluate import evaluate
from smooseg.eval.metrics import ClusterMetrics
from smooseg.model.losses import LossConfig, total_loss

N_CLASSES = 3


class Blobs(Dataset):
    """Random normalised images with a 3-class label map (left / middle / right thirds)."""

    def __init__(self, n, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.imgs = torch.randn(n, 3, size, size, generator=g)
        label = torch.zeros(size, size, dtype=torch.long)
        label[:, size // 3:] = 1
        label[:, 2 * size // 3:] = 2
        label[:2] = -1
        self.label = label

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        return {"img": self.imgs[i], "label": self.label.clone(), "name": str(i)}


def make_module(**kwargs):
    options = dict(n_classes=N_CLASSES, dataset_name="directory", model_type="vit_small",
                   patch_size=16, dim=16, n_log_images=2)
    options.update(kwargs)
    return conftest.make_module(**options)


def make_trainer(tmp_path, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   log_every_n_steps=1, max_epochs=-1, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_training_and_validation_logging(tmp_path):
    pl.seed_everything(0)
    module = make_module(lr1=3e-4, lr2=2e-3)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=2, val_check_interval=2,
                           check_val_every_n_epoch=None)
    val = DataLoader(Blobs(3, seed=1), batch_size=2)
    trainer.fit(module, DataLoader(Blobs(4), batch_size=2), val)
    logged = trainer.logged_metrics
    for key in ("train/loss", "train/intra", "train/inter", "train/data",
                "lr/projector", "lr/prototypes", "val/cluster/mIoU", "val/cluster/Accuracy"):
        assert key in logged, key
    assert float(logged["lr/projector"]) == pytest.approx(3e-4)
    assert float(logged["lr/prototypes"]) == pytest.approx(2e-3)
    assert "train/smooth" not in logged  # the module logs the terms total_loss returns, nothing else
    assert float(logged["train/loss"]) == pytest.approx(
        float(logged["train/intra"]) + float(logged["train/inter"]) + float(logged["train/data"]), abs=1e-5)

    # validation = teacher prediction at label size, no flip, Hungarian metrics over all 3 images
    module.eval()
    metric = ClusterMetrics(N_CLASSES, N_CLASSES)
    with torch.no_grad():
        for batch in val:
            metric.update(module.net(batch["img"]).argmax(1), batch["label"])
    expected = metric.compute()
    assert float(logged["val/cluster/mIoU"]) == pytest.approx(expected["mIoU"], abs=1e-4)
    assert float(logged["val/cluster/Accuracy"]) == pytest.approx(expected["Accuracy"], abs=1e-4)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "val/examples" in events.Tags()["images"]
    picture = events.Images("val/examples")[-1]
    # 3 titled panels enlarged ×6, 2 rows
    assert (picture.width, picture.height) == (3 * 192 + 2 * 4, 2 * (192 + 20))


class RecordPrototypes(pl.Callback):
    """Student and teacher prototypes as each training batch starts (before its step)."""

    def __init__(self):
        self.students, self.teachers = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.students.append(pl_module.net.predictor.student.detach().clone())
        self.teachers.append(pl_module.net.predictor.teacher.clone())


def test_ema_uses_the_student_before_each_step(tmp_path):
    """After n steps teacher = a^n t0 + sum_k a^(n-1-k) (1-a) s_k over the PRE-step students s_k
    (the teacher lags the student by one step, as in the reference)."""
    pl.seed_everything(0)
    alpha, steps = 0.5, 3
    module = make_module(ema_alpha=alpha)
    with torch.no_grad():
        module.net.predictor.teacher.copy_(torch.randn_like(module.net.predictor.teacher))
    teacher = module.net.predictor.teacher.clone()
    record = RecordPrototypes()
    trainer = make_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, DataLoader(Blobs(2 * steps), batch_size=2))
    assert trainer.global_step == steps and len(record.students) == steps
    for k, student in enumerate(record.students):
        torch.testing.assert_close(record.teachers[k], teacher, atol=1e-6, rtol=0)  # step k saw this teacher
        teacher = alpha * teacher + (1 - alpha) * student
    torch.testing.assert_close(module.net.predictor.teacher, teacher, atol=1e-6, rtol=0)
    after = alpha * record.teachers[-1] + (1 - alpha) * module.net.predictor.student.detach()
    assert not torch.allclose(module.net.predictor.teacher, after, atol=1e-4)  # not the post-step student


def test_ema_once_per_optimiser_step_with_accumulation(tmp_path):
    pl.seed_everything(0)
    alpha = 0.5
    module = make_module(ema_alpha=alpha)
    with torch.no_grad():
        module.net.predictor.teacher.copy_(torch.randn_like(module.net.predictor.teacher))
    teacher0 = module.net.predictor.teacher.clone()
    student0 = module.net.predictor.student.detach().clone()
    trainer = make_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, DataLoader(Blobs(4), batch_size=2))
    assert trainer.global_step == 1
    student1 = module.net.predictor.student.detach()
    assert not torch.allclose(student1, student0)  # the optimiser did step
    once = alpha * teacher0 + (1 - alpha) * student0
    assert torch.allclose(module.net.predictor.teacher, once, atol=1e-6)
    twice = alpha * (alpha * teacher0 + (1 - alpha) * student0) + (1 - alpha) * student0
    assert not torch.allclose(once, twice, atol=1e-4)


def test_backbone_gets_no_gradients():
    module = make_module()
    module.train()
    batch = Blobs(2)[0]
    img = torch.stack([batch["img"], -batch["img"]])
    signal, code = module.net.projector(module.net.backbone(img))
    student, teacher = module.net.predictor(code)
    config = LossConfig(pos_intra_shift=-0.02, neg_inter_shift=0.5)
    total_loss(signal, student, teacher, config)["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.net.backbone.parameters())
    assert not module.net.backbone.model.training  # the ViT stays in eval mode while training
    assert all(p.grad is not None for p in module.net.projector.parameters())
    assert module.net.predictor.student.grad is not None
    optimiser = module.configure_optimizers()
    grouped = [list(g["params"]) for g in optimiser.param_groups]
    assert [g["lr"] for g in optimiser.param_groups] == [1e-4, 5e-4]
    assert len(grouped[0]) == len(list(module.net.projector.parameters()))
    assert grouped[1] == [module.net.predictor.student]


def test_cluster_log_probs_shape_and_flip_average():
    torch.manual_seed(0)
    module = make_module().eval()
    img = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        plain = module.net(img, (40, 56))
        flipped = module.net(img, (40, 56), flip=True)
        code = (module.net.code(img) + module.net.code(img.flip(-1)).flip(-1)) / 2
        code = F.interpolate(code, size=(40, 56), mode="bilinear", align_corners=False)
        unit = F.normalize(code, dim=1)
        teacher = F.normalize(module.net.predictor.teacher, dim=1)
        manual = torch.log_softmax(2 * torch.einsum("bdhw,kd->bkhw", unit, teacher), dim=1)
    assert plain.shape == (2, N_CLASSES, 40, 56)
    assert torch.allclose(plain.exp().sum(1), torch.ones(2, 40, 56), atol=1e-5)
    assert torch.allclose(flipped, manual, atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=1e-3)
    assert module.net(img).shape[-2:] == (32, 48)  # default: image size


def test_prediction_uses_the_teacher_only():
    module = make_module().eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = module.net(img)
        module.net.predictor.student.copy_(torch.randn_like(module.net.predictor.student))
        assert torch.equal(module.net(img), before)
        module.net.predictor.teacher.copy_(torch.randn_like(module.net.predictor.teacher))
        assert not torch.allclose(module.net(img), before)


def test_evaluation_flip_and_crf(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    data = DataLoader(Blobs(3, seed=2), batch_size=2)
    with CRFPool(num_workers=0) as pool:
        result, _ = evaluate(module.net, data, module.data, crf_pool=pool, flip=True, show_progress=False)
    metric = ClusterMetrics(N_CLASSES, N_CLASSES)
    module.eval()
    with torch.no_grad():
        for batch in data:
            metric.update(module.net(batch["img"], flip=True).argmax(1), batch["label"])
    assert result["nocrf"]["mIoU"] == pytest.approx(metric.compute()["mIoU"], abs=1e-4)
    for key in ("mIoU", "Accuracy"):
        assert 0.0 <= result[key] <= 100.0
    assert np.isfinite(result["Accuracy"])
