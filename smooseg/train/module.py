"""The SmooSeg LightningModule: training and validation of an injected :class:`SmooSegNet`.

Training (docs/method.md section 4): both loss terms, their sum and both learning rates are
logged; the teacher prototypes follow the student by EMA once per optimiser step, from the
student before that step's update (section 3).  Validation: the net's prediction, Hungarian
metrics ``val/cluster/mIoU`` / ``val/cluster/Accuracy`` and a TensorBoard picture grid.
Diagnostics (off by default, docs/shift_tuning.md): a supervised linear probe on the detached
code (the net's ``linear_probe``) and histograms of the smoothness terms every ``hist_freq`` steps.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger

from smooseg.data.datasets import DatasetInfo
from smooseg.data.transforms import to_uint8_image, unnormalize
from smooseg.errors import SmoosegError
from smooseg.eval.metrics import ClusterMetrics, cluster_to_class_map
from smooseg.eval.pictures import titled_row
from smooseg.model.checkpoints import CHECKPOINT_LAYOUT, upgrade_checkpoint
from smooseg.model.losses import LossConfig, random_pairing, shift_histograms, smoothness_parts, total_loss
from smooseg.model.net import NetConfig, SmooSegNet
from smooseg.runtime import fp32_region
from smooseg.viz import colorize, colormap


@dataclass(frozen=True)
class OptimConfig:
    """Adam learning rates: projector, student prototypes, linear probe (diagnostic)."""

    lr1: float = 1e-4
    lr2: float = 5e-4
    linear_lr: float = 5e-3


def example_row(img, label, pred_classes, palette):
    """One uint8 row of TensorBoard's ``val/examples``: the un-normalised image, its coloured label
    and the coloured prediction, titled and enlarged to a readable size (:func:`titled_row`)."""
    image = to_uint8_image(unnormalize(img.float()))
    return titled_row([image, colorize(label.numpy(), palette), colorize(pred_classes.numpy(), palette)],
                      ("image", "ground truth", "prediction"))


class NonFiniteLossError(SmoosegError):
    """The training loss became NaN or infinite at optimiser step ``step`` (1-based)."""

    def __init__(self, step):
        self.step = int(step)
        super().__init__(f"non-finite training loss (NaN or inf) at step {self.step}; lower the "
                         "learning rates (optim.lr1 / optim.lr2) or check the data")


NO_LABELLED_PIXEL = ("validation: no pixel of the validation images has a class label (every label is the "
                     "ignore value), so no mIoU is logged and no best checkpoint is kept; check the label "
                     "files of the validation split")


class SmooSegModule(pl.LightningModule):
    """Trains ``net`` (a :class:`SmooSegNet`) for the data set ``data``.

    The hyper-parameters saved in checkpoints are grouped: ``net`` (the net's identity,
    :class:`NetConfig`), ``data`` (:class:`DatasetInfo`), ``loss``, ``optim``, ``metrics``,
    ``diagnostics`` and ``runtime`` (how it ran: provenance only).
    :func:`smooseg.model.checkpoints.load_net` rebuilds the net from them without Lightning.
    """

    def __init__(self, net: SmooSegNet, data: DatasetInfo, loss: LossConfig | None = None,
                 optim: OptimConfig = OptimConfig(), mask_extra_clusters=False, n_log_images=4,
                 hist_freq=0, compile=False):
        super().__init__()
        self.net = net
        self.data = data
        loss = LossConfig() if loss is None else loss  # a fresh one: LossConfig is mutable
        self.loss_config, self.optim_config = loss, optim
        self.save_hyperparameters({
            "layout": CHECKPOINT_LAYOUT, "net": net.config.to_dict(), "data": data.to_dict(),
            "loss": dataclasses.asdict(loss), "optim": dataclasses.asdict(optim),
            "metrics": {"mask_extra_clusters": bool(mask_extra_clusters)},
            "diagnostics": {"n_log_images": int(n_log_images), "hist_freq": int(hist_freq)},
            "runtime": {"compile": bool(compile), "fused_attn": net.backbone.fused_attn,
                        "pretrained": net.pretrained, "backbone_precision": net.backbone_precision},
        })
        self.n_log_images, self.hist_freq, self.compile = int(n_log_images), int(hist_freq), bool(compile)
        net.compile_backbone = self.compile
        n, k = data.n_classes, net.n_clusters
        self.val_metrics = ClusterMetrics(n, k, mask_extra_clusters)
        self.val_linear_metrics = (ClusterMetrics(n, n, match="identity")
                                   if net.linear_probe is not None else None)
        self._examples = []
        self.val_labelled = True  # train() sets False when the validation images have no labels
        self._said_no_labelled_pixel = False
        self._compiled_losses = None  # torch.compile'd heads + loss (``compile``), built on first use
        self._hist_step = None  # last step whose shift histograms were logged

    @classmethod
    def from_hparams(cls, hparams, **build):
        """A module (fresh weights) from grouped hyper-parameters, as a checkpoint holds them;
        ``build`` goes to :class:`SmooSegNet` (e.g. ``pretrained=False``)."""
        runtime = hparams.get("runtime") or {}
        net = SmooSegNet(NetConfig.from_dict(hparams["net"]), fused_attn=runtime.get("fused_attn", True),
                         backbone_precision=runtime.get("backbone_precision", "auto"), **build)
        diagnostics = hparams.get("diagnostics") or {}
        return cls(net, DatasetInfo(**hparams["data"]), LossConfig(**hparams.get("loss", {})),
                   OptimConfig(**hparams.get("optim", {})),
                   mask_extra_clusters=bool((hparams.get("metrics") or {}).get("mask_extra_clusters", False)),
                   n_log_images=diagnostics.get("n_log_images", 4), hist_freq=diagnostics.get("hist_freq", 0),
                   compile=bool(runtime.get("compile", False)))

    @property
    def class_names(self):
        return self.data.class_names

    def on_train_start(self):
        """The configured learning rates hold, also when a resumed run changed them
        (``resume_changes``): a checkpoint restores the optimiser with the rates it had."""
        rates = [self.optim_config.lr1, self.optim_config.lr2, self.optim_config.linear_lr]
        # strict=False: without a linear probe there are two groups and linear_lr goes unused
        for group, rate in zip(self.trainer.optimizers[0].param_groups, rates, strict=False):
            group["lr"] = rate

    def on_load_checkpoint(self, checkpoint):
        """Resuming from a checkpoint of this package's earlier layout converts it first."""
        upgrade_checkpoint(checkpoint)

    # ---- training (docs/method.md section 4) ----
    def features(self, batch):
        """Backbone features of a training batch: ``batch["feats"]`` when it comes from the feature
        cache, else the net's frozen backbone on ``batch["img"]``."""
        if "feats" in batch:
            return batch["feats"].float()
        return self.net.features(batch["img"])

    def _losses(self, feats):
        cfg = self.loss_config
        signal, code = self.net.projector(feats)
        student, teacher = self.net.predictor(code)
        pairing = random_pairing(feats.shape[0])  # drawn here so diagnostics see the loss's pairing
        terms = total_loss(signal, student, teacher, cfg, pairing=pairing)
        return {"terms": terms, "code": code, "signal": signal, "teacher": teacher, "pairing": pairing}

    def training_losses(self, feats):
        """Heads + losses of backbone features: ``terms`` (what :func:`total_loss` returns: each
        weighted term by name and their sum ``total``) and the ``code``, ``signal``, ``teacher`` logits
        and image ``pairing`` they came from (for the diagnostics).
        With ``compile`` the heads and loss run through ``torch.compile`` (compiled on first use)."""
        if not self.compile:
            return self._losses(feats)
        if self._compiled_losses is None:
            self._compiled_losses = torch.compile(self._losses)
        return self._compiled_losses(feats)

    def training_step(self, batch, batch_idx):
        feats = self.features(batch)
        losses = self.training_losses(feats)
        loss = losses["terms"]["total"]
        self.check_finite(loss)
        options = dict(batch_size=feats.shape[0], sync_dist=True)  # mean over processes
        self.log("train/loss", loss, prog_bar=True, **options)
        for name, term in losses["terms"].items():
            if name != "total":
                self.log(f"train/{name}", term, **options)
        groups = self.trainer.optimizers[0].param_groups
        self.log("lr/projector", groups[0]["lr"], batch_size=options["batch_size"])
        self.log("lr/prototypes", groups[1]["lr"], batch_size=options["batch_size"])
        self._log_shift_histograms(losses)
        if self.net.linear_probe is None:
            return loss
        linear = self.linear_probe_loss(losses["code"], batch["label"])
        self.log("train/linear", linear, **options)
        self.log("lr/linear", groups[2]["lr"], batch_size=options["batch_size"])
        # the probe sees a detached code: adding its loss leaves the unsupervised gradients as they are
        return loss + linear

    def check_finite(self, loss):
        """Raise NonFiniteLossError on every process, before the optimiser step, when the loss of
        any process is NaN or infinite (all processes decide together, so none waits forever)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(self.global_step + 1)

    def on_before_optimizer_step(self, optimizer):
        """Move the teacher prototypes toward the student as it is BEFORE this step's update.

        This step's loss already used the teacher as it was, so the teacher lags the student by one
        step: the reference's timing (docs/method.md section 3). Lightning calls this once per
        optimiser step, after backward, so under gradient accumulation the EMA still runs once.
        """
        self.net.predictor.ema_update(self.loss_config.ema_alpha)

    def configure_optimizers(self):
        groups = [
            {"params": list(self.net.projector.parameters()), "lr": self.optim_config.lr1},
            {"params": [self.net.predictor.student], "lr": self.optim_config.lr2},
        ]
        if self.net.linear_probe is not None:  # appended: groups 0 / 1 stay projector / prototypes
            groups.append({"params": list(self.net.linear_probe.parameters()),
                           "lr": self.optim_config.linear_lr})
        return torch.optim.Adam(groups)

    # ---- diagnostics: linear probe, shift histograms (docs/shift_tuning.md) ----
    def linear_probe_loss(self, code, label):
        """Cross-entropy of the linear probe on the DETACHED code against labels B×H×W (−1 ignored);
        the probe's logits are upsampled bilinearly to the label size. 0 when no pixel is labelled."""
        log_probs = self.net.linear_log_probs(code.detach(), label.shape[-2:])
        with fp32_region(log_probs.device):
            label = label.long()
            total = F.nll_loss(log_probs, label, ignore_index=-1, reduction="sum")
            return total / (label >= 0).sum().clamp(min=1)

    def _log_shift_histograms(self, losses):
        """Every ``hist_freq`` steps (rank zero, TensorBoard only): histograms of the smoothness
        terms' similarities, weights (similarity − shift) and assignment distances, plus the share
        of attracting pairs, for the batch just trained on (see docs/shift_tuning.md)."""
        freq, step = self.hist_freq, self.global_step
        if freq <= 0 or step % freq or step == self._hist_step or not self.trainer.is_global_zero:
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        self._hist_step = step
        cfg = self.loss_config
        parts = smoothness_parts(losses["signal"], losses["teacher"], temperature=cfg.temperature,
                                 pointwise=cfg.pointwise, pairing=losses["pairing"])
        values, fractions = shift_histograms(parts, cfg.pos_intra_shift, cfg.neg_inter_shift,
                                             generator=torch.Generator().manual_seed(step))
        for lg in loggers:
            for name, v in values.items():
                lg.experiment.add_histogram(f"hist/{name}", v.detach().float().cpu(), step)
            for term, fraction in fractions.items():
                lg.experiment.add_scalar(f"shift/{term}_attract_fraction", float(fraction), step)

    # ---- validation ----
    def on_validation_epoch_start(self):
        self._examples = []

    def validation_step(self, batch, batch_idx):
        img, label = batch["img"], batch["label"]
        code = self.net.predict_code(img)
        preds = self.net.cluster_log_probs(code, label.shape[-2:]).argmax(1)
        self.val_metrics.update(preds, label)
        if self.net.linear_probe is not None:
            self.val_linear_metrics.update(self.net.linear_log_probs(code, label.shape[-2:]).argmax(1), label)
        room = self.n_log_images - len(self._examples)
        for i in range(min(room, img.shape[0])):
            self._examples.append((img[i].detach().cpu(), label[i].cpu(), preds[i].cpu()))

    def on_validation_epoch_end(self):
        if not self.val_labelled:  # own photos without labels: pictures only, no metric (and no NaN)
            self.val_metrics.reset()
            self._pictures_only()
            return
        result = self.val_metrics.compute()
        self.val_metrics.reset()
        if not result["confusion"].sum():  # labels, but not one labelled pixel: nothing to score
            self._pictures_only(NO_LABELLED_PIXEL)
            return
        # the metric already summed the counts of all processes: every process logs the same value
        self.log("val/cluster/mIoU", result["mIoU"], prog_bar=True, sync_dist=True)
        self.log("val/cluster/Accuracy", result["Accuracy"], sync_dist=True)
        if self.net.linear_probe is not None:
            linear = self.val_linear_metrics.compute()
            self.val_linear_metrics.reset()
            self.log("val/linear/mIoU", linear["mIoU"], sync_dist=True)
            self.log("val/linear/Accuracy", linear["Accuracy"], sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_examples(cluster_to_class_map(result["assignment"], self.net.n_clusters))
        self._examples = []

    def _pictures_only(self, reason=None):
        """A validation with nothing to score: no metric is logged (so no NaN and no best
        checkpoint), the pictures are (clusters as their own classes), and ``reason``, when
        given, is printed once per run."""
        if self.val_linear_metrics is not None:
            self.val_linear_metrics.reset()
        if not self.trainer.sanity_checking:
            self._log_examples(torch.arange(self.net.n_clusters))
            if reason and self.trainer.is_global_zero and not self._said_no_labelled_pixel:
                print(reason, flush=True)
                self._said_no_labelled_pixel = True
        self._examples = []

    def _log_examples(self, to_class):
        """Image / label / prediction grid, the prediction coloured through ``to_class`` (the
        Hungarian map; the identity for unlabelled images, whose clusters are their own classes)."""
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not self._examples or not self.trainer.is_global_zero:
            return
        palette = colormap(self.data.name, max(self.data.n_classes, self.net.n_clusters))
        grid = np.concatenate(
            [example_row(img, label, to_class[pred], palette) for img, label, pred in self._examples],
            axis=0)
        for lg in loggers:
            lg.experiment.add_image("val/examples", grid, self.global_step, dataformats="HWC")
