"""The SmooSeg LightningModule: frozen backbone + projector + prototypes, trained with SPEC §4.

Training: both loss terms, their sum and both learning rates are logged; the teacher prototypes
follow the student by EMA once per optimiser step, from the student before that step's update. Validation: teacher prediction, Hungarian
metrics ``val/cluster/mIoU`` / ``val/cluster/Accuracy`` and a TensorBoard picture grid.
Test: horizontal-flip averaging and, when ``crf_pool`` is set, the dense CRF.
Diagnostics (off by default, docs/shift_tuning.md): a supervised linear probe on the detached
code (``linear_probe``) and histograms of the smoothness terms every ``hist_freq`` steps.
"""

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from smooseg.backbone import Backbone
from smooseg.crf import to_uint8_image
from smooseg.data.datasets import CLASS_NAMES
from smooseg.data.transforms import unnormalize
from smooseg.errors import SmoosegError
from smooseg.feature_cache import frozen_features
from smooseg.heads import Projector, PrototypePredictor, fp32_region
from smooseg.losses import random_pairing, shift_histograms, smoothness_parts, total_loss
from smooseg.metrics import ClusterMetrics, cluster_to_class_map
from smooseg.viz import colorize, colormap


def default_class_names(dataset_name, n_classes):
    """The data set's class names when it has them and the count fits, else ``class_<i>``."""
    names = CLASS_NAMES.get(dataset_name)
    if names is not None and len(names) == n_classes:
        return list(names)
    return [f"class_{i}" for i in range(n_classes)]


def example_row(img, label, pred_classes, palette):
    """One H×3W×3 uint8 row: the un-normalised image, its coloured label, the coloured prediction."""
    image = to_uint8_image(unnormalize(img.float()))
    return np.concatenate(
        [image, colorize(label.numpy(), palette), colorize(pred_classes.numpy(), palette)], axis=1)


class NonFiniteLossError(SmoosegError):
    """The training loss became NaN or infinite at optimiser step ``step`` (1-based)."""

    def __init__(self, step):
        self.step = int(step)
        super().__init__(f"non-finite training loss (NaN or inf) at step {self.step}; lower the "
                         "learning rates (optim.lr1 / optim.lr2) or check the data")


class SmooSegModule(pl.LightningModule):
    """SmooSeg model and its training / validation / test steps.

    Every argument is saved with ``save_hyperparameters`` so that a checkpoint alone rebuilds
    the model (see :func:`smooseg.checkpoints.load_module`). ``eval_res``, ``image_interp`` and
    ``dir_name`` (directory data sets) are not used by the model; they record how it was validated
    so evaluation can default to them.
    """

    def __init__(self, n_classes, dataset_name="directory", class_names=None,
                 arch="dino", model_type="vit_small", patch_size=8, feat_type="feat",
                 pretrained=True, weights_path=None, fit="error", fused_attn=True,
                 dim=64, projection_type="nonlinear", dropout=True, extra_clusters=0,
                 temperature=0.1, ema_alpha=0.998, pos_intra_shift=-0.02, neg_inter_shift=0.5,
                 pointwise=True, lr1=1e-4, lr2=5e-4, mask_extra_clusters=False,
                 n_log_images=4, eval_res=None, image_interp="nearest", dir_name=None,
                 backbone_precision="auto", compile=False,
                 linear_probe=False, linear_lr=5e-3, hist_freq=0):
        super().__init__()
        if class_names is None:
            class_names = default_class_names(dataset_name, n_classes)
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.n_clusters = n_classes + extra_clusters
        self.backbone = Backbone(arch=arch, model_type=model_type, patch_size=patch_size,
                                 feat_type=feat_type, pretrained=pretrained,
                                 weights_path=weights_path, fit=fit, fused_attn=fused_attn)
        self.projector = Projector(self.backbone.n_feats, dim=dim,
                                   projection_type=projection_type, dropout=dropout)
        self.predictor = PrototypePredictor(dim, self.n_clusters)
        self.val_metrics = ClusterMetrics(n_classes, self.n_clusters, mask_extra_clusters)
        self.test_metrics = ClusterMetrics(n_classes, self.n_clusters, mask_extra_clusters)
        self.test_crf_metrics = ClusterMetrics(n_classes, self.n_clusters, mask_extra_clusters)
        self.test_flip = True
        self.crf_pool = None  # set a smooseg.crf.CRFPool to refine test predictions with the CRF
        self._examples = []
        self._compiled = {}  # torch.compile'd callables by name (``compile``), built on first use
        # Supervised diagnostic (off by default): 1×1 conv code -> classes on the detached code.
        # Initialised on a forked RNG so that turning it on leaves the training's random draws alone.
        self.linear_probe = None
        if linear_probe:
            with torch.random.fork_rng(devices=[]):
                self.linear_probe = nn.Conv2d(dim, n_classes, 1)
        self.val_linear_metrics = (ClusterMetrics(n_classes, n_classes, match="identity")
                                   if linear_probe else None)
        self._hist_step = None  # last step whose shift histograms were logged

    # ---- prediction (SPEC §5) ----
    def code(self, img):
        """Projector code B×D×h×w of normalised images B×3×H×W."""
        return self.projector(self.backbone(img))[1]

    def cluster_log_probs(self, img, size=None, flip=False):
        """Cluster log-probabilities B×K×H×W = log_softmax(2·T) at ``size`` (default: image size).

        T are the teacher logits of the code upsampled bilinearly; with ``flip`` the code is the
        average of code(x) and flip(code(flip(x))), taken before upsampling.
        """
        size = tuple(img.shape[-2:]) if size is None else tuple(size)
        return self.code_log_probs(self.predict_code(img, flip), size)

    def predict_code(self, img, flip=False):
        """Code B×D×h×w for prediction; with ``flip`` the average of code(x) and flip(code(flip(x)))."""
        code = self.code(img)
        if flip:
            code = (code + self.code(img.flip(-1)).flip(-1)) / 2
        return code

    def code_log_probs(self, code, size):
        """Cluster log-probabilities B×K×H×W of a code upsampled bilinearly to ``size``."""
        code = F.interpolate(code, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.log_softmax(2 * self.predictor.teacher_logits(code), dim=1)

    def linear_log_probs(self, code, size):
        """Linear-probe class log-probabilities B×n_classes×H×W: the probe's logits of ``code``
        upsampled bilinearly to ``size`` (STEGO's linear probe). Needs ``linear_probe=True``."""
        logits = F.interpolate(self.linear_probe(code), size=tuple(size), mode="bilinear",
                               align_corners=False)
        return torch.log_softmax(logits.float(), dim=1)

    def forward(self, img):
        """Cluster index map B×H×W of a batch of normalised images (no flip, no CRF)."""
        return self.cluster_log_probs(img).argmax(1)

    # ---- training (SPEC §4) ----
    def features(self, batch):
        """Backbone features B×C×h×w of a training batch: ``batch["feats"]`` when the batch comes
        from the feature cache, else the frozen backbone on ``batch["img"]`` (inference mode,
        ``backbone_precision`` autocast; see :func:`smooseg.feature_cache.frozen_features`)."""
        if "feats" in batch:
            return batch["feats"].float()
        return frozen_features(self._maybe_compiled("backbone", self.backbone), batch["img"],
                               self.hparams.get("backbone_precision", "auto"))

    def _maybe_compiled(self, name, fn):
        """``fn`` itself, or with the ``compile`` hyper-parameter its ``torch.compile`` version,
        built on first use and kept by ``name`` in a plain dict (so the state dict keeps its keys)."""
        if not self.hparams.get("compile", False):
            return fn
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn)
        return self._compiled[name]

    def _losses(self, feats):
        hp = self.hparams
        signal, code = self.projector(feats)
        student, teacher = self.predictor(code)
        pairing = random_pairing(feats.shape[0])  # drawn here so diagnostics see the loss's pairing
        losses = total_loss(signal, student, teacher, hp.pos_intra_shift, hp.neg_inter_shift,
                            temperature=hp.temperature, pointwise=hp.pointwise, pairing=pairing)
        return dict(losses, code=code, signal=signal, teacher=teacher, pairing=pairing)

    def training_losses(self, feats):
        """Heads + SPEC §4 losses of backbone features: the dict of total_loss plus the ``code``,
        ``signal``, ``teacher`` logits and image ``pairing`` they came from (for the diagnostics).
        With the ``compile`` hyper-parameter the heads and loss run through ``torch.compile``
        (compiled on first use)."""
        return self._maybe_compiled("losses", self._losses)(feats)

    def training_step(self, batch, batch_idx):
        feats = self.features(batch)
        losses = self.training_losses(feats)
        self.check_finite(losses["total"])
        options = dict(batch_size=feats.shape[0], sync_dist=True)  # mean over processes
        self.log("train/loss", losses["total"], prog_bar=True, **options)
        for key in ("smooth", "intra", "inter", "data"):
            self.log(f"train/{key}", losses[key], **options)
        groups = self.trainer.optimizers[0].param_groups
        self.log("lr/projector", groups[0]["lr"], batch_size=options["batch_size"])
        self.log("lr/prototypes", groups[1]["lr"], batch_size=options["batch_size"])
        self._log_shift_histograms(losses)
        if self.linear_probe is None:
            return losses["total"]
        linear = self.linear_probe_loss(losses["code"], batch["label"])
        self.log("train/linear", linear, **options)
        self.log("lr/linear", groups[2]["lr"], batch_size=options["batch_size"])
        # the probe sees a detached code: adding its loss leaves the unsupervised gradients as they are
        return losses["total"] + linear

    def check_finite(self, loss):
        """Raise NonFiniteLossError on every process, before the optimiser step, when the loss of
        any process is NaN or infinite (all processes decide together, so none waits forever)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(self.global_step + 1)

    def configure_optimizers(self):
        groups = [
            {"params": list(self.projector.parameters()), "lr": self.hparams.lr1},
            {"params": [self.predictor.student], "lr": self.hparams.lr2},
        ]
        if self.linear_probe is not None:  # appended: groups 0 / 1 stay projector / prototypes
            groups.append({"params": list(self.linear_probe.parameters()), "lr": self.hparams.linear_lr})
        return torch.optim.Adam(groups)

    # ---- diagnostics: linear probe, shift histograms (docs/shift_tuning.md) ----
    def linear_probe_loss(self, code, label):
        """Cross-entropy of the linear probe on the DETACHED code against labels B×H×W (−1 ignored);
        the probe's logits are upsampled bilinearly to the label size. 0 when no pixel is labelled."""
        log_probs = self.linear_log_probs(code.detach(), label.shape[-2:])
        with fp32_region(log_probs.device):
            label = label.long()
            total = F.nll_loss(log_probs, label, ignore_index=-1, reduction="sum")
            return total / (label >= 0).sum().clamp(min=1)

    def _log_shift_histograms(self, losses):
        """Every ``hist_freq`` steps (rank zero, TensorBoard only): histograms of the smoothness
        terms' similarities, weights (similarity − shift) and assignment distances, plus the share
        of attracting pairs, for the batch just trained on (see docs/shift_tuning.md)."""
        freq, step = int(self.hparams.get("hist_freq") or 0), self.global_step
        if freq <= 0 or step % freq or step == self._hist_step or not self.trainer.is_global_zero:
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        self._hist_step = step
        hp = self.hparams
        parts = smoothness_parts(losses["signal"], losses["teacher"], temperature=hp.temperature,
                                 pointwise=hp.pointwise, pairing=losses["pairing"])
        values, fractions = shift_histograms(parts, hp.pos_intra_shift, hp.neg_inter_shift,
                                             generator=torch.Generator().manual_seed(step))
        for lg in loggers:
            for name, v in values.items():
                lg.experiment.add_histogram(f"hist/{name}", v.detach().float().cpu(), step)
            for term, fraction in fractions.items():
                lg.experiment.add_scalar(f"shift/{term}_attract_fraction", float(fraction), step)

    def on_before_optimizer_step(self, optimizer):
        """Move the teacher prototypes toward the student as it is BEFORE this step's update.

        This step's loss already used the teacher as it was, so the teacher lags the student by one
        step: the reference's timing (docs/method.md section 3). Lightning calls this once per
        optimiser step, after backward, so under gradient accumulation the EMA still runs once.
        """
        self.predictor.ema_update(self.hparams.ema_alpha)

    # ---- validation ----
    def on_validation_epoch_start(self):
        self._examples = []

    def validation_step(self, batch, batch_idx):
        img, label = batch["img"], batch["label"]
        code = self.predict_code(img)
        preds = self.code_log_probs(code, label.shape[-2:]).argmax(1)
        self.val_metrics.update(preds, label)
        if self.linear_probe is not None:
            self.val_linear_metrics.update(self.linear_log_probs(code, label.shape[-2:]).argmax(1), label)
        room = self.hparams.n_log_images - len(self._examples)
        for i in range(min(room, img.shape[0])):
            self._examples.append((img[i].detach().cpu(), label[i].cpu(), preds[i].cpu()))

    def on_validation_epoch_end(self):
        result = self.val_metrics.compute()
        self.val_metrics.reset()
        # the metric already summed the counts of all processes: every process logs the same value
        self.log("val/cluster/mIoU", result["mIoU"], prog_bar=True, sync_dist=True)
        self.log("val/cluster/Accuracy", result["Accuracy"], sync_dist=True)
        if self.linear_probe is not None:
            linear = self.val_linear_metrics.compute()
            self.val_linear_metrics.reset()
            self.log("val/linear/mIoU", linear["mIoU"], sync_dist=True)
            self.log("val/linear/Accuracy", linear["Accuracy"], sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_examples(result["assignment"])
        self._examples = []

    def _log_examples(self, assignment):
        """Image / label / prediction grid (prediction coloured through the Hungarian map)."""
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not self._examples or not self.trainer.is_global_zero:
            return
        to_class = cluster_to_class_map(assignment, self.n_clusters)
        palette = colormap(self.hparams.dataset_name, self.hparams.n_classes)
        grid = np.concatenate(
            [example_row(img, label, to_class[pred], palette) for img, label, pred in self._examples],
            axis=0)
        for lg in loggers:
            lg.experiment.add_image("val/examples", grid, self.global_step, dataformats="HWC")

    # ---- test ----
    def test_step(self, batch, batch_idx):
        img, label = batch["img"], batch["label"]
        log_probs = self.cluster_log_probs(img, label.shape[-2:], flip=self.test_flip)
        self.test_metrics.update(log_probs.argmax(1), label)
        if self.crf_pool is not None:
            images = [to_uint8_image(x) for x in unnormalize(img.float()).cpu()]
            crf_labels = self.crf_pool.map(images, log_probs.float().cpu(), labels=True)
            preds = torch.from_numpy(np.stack(crf_labels).astype(np.int64)).to(label.device)
            self.test_crf_metrics.update(preds, label)

    def on_test_epoch_end(self):
        result = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log("test/cluster/mIoU", result["mIoU"])
        self.log("test/cluster/Accuracy", result["Accuracy"])
        if self.crf_pool is not None:
            result = self.test_crf_metrics.compute()
            self.test_crf_metrics.reset()
            self.log("test/crf/mIoU", result["mIoU"])
            self.log("test/crf/Accuracy", result["Accuracy"])
