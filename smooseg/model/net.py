"""The SmooSeg network in plain PyTorch: frozen backbone -> projector -> prototypes, and the one
prediction path every caller uses (validation, evaluation, segmenting images, demo, benchmarks).

:class:`NetConfig` is the model's identity: what a checkpoint must hold to rebuild it.  How it
runs (pretrained weights to start from, fused attention, the backbone's autocast precision,
``torch.compile``) is chosen when it is built and is not part of that identity.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smooseg.model.backbone import Backbone, frozen_features
from smooseg.model.heads import Projector, PrototypePredictor


@dataclass(frozen=True)
class NetConfig:
    """Everything that fixes the network's shape and computation (docs/method.md sections 1-3)."""

    n_clusters: int
    arch: str = "dino"
    model_type: str = "vit_small"
    patch_size: int = 8
    feat_type: str = "feat"
    fit: str | None = None  # None: the backbone spec's default
    weights_data: str | None = None  # the release (fixes the input normalisation); None: the default
    dim: int = 64
    projection_type: str = "nonlinear"
    dropout: bool = True
    linear_probe_classes: int | None = None  # a supervised 1x1 probe on the code (diagnostic)

    @classmethod
    def from_dict(cls, values):
        """The config from a dict that may hold other keys too (those are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def to_dict(self):
        return dataclasses.asdict(self)

    def describe(self):
        """E.g. "the dino/vit_small/8 dim=64 model" (for error messages)."""
        return f"the {self.arch}/{self.model_type}/{self.patch_size} dim={self.dim} model"


class SmooSegNet(nn.Module):
    """Backbone features -> code -> cluster log-probabilities -> prediction.

    Prediction (docs/method.md section 5): the code (optionally flip-averaged) is upsampled
    bilinearly to the output size, the teacher logits T are taken there and the cluster
    log-probabilities are log_softmax(2 T).
    """

    def __init__(self, config: NetConfig, pretrained=True, weights_path=None, weights_url=None,
                 fused_attn=True, backbone_precision="auto", compile_backbone=False,
                 weights_source="official"):
        super().__init__()
        self.config = config
        self.pretrained = bool(pretrained)  # provenance: the backbone started from the official weights
        self.backbone = Backbone(arch=config.arch, model_type=config.model_type, patch_size=config.patch_size,
                                 feat_type=config.feat_type, pretrained=pretrained, weights_path=weights_path,
                                 fit=config.fit, fused_attn=fused_attn, weights_url=weights_url,
                                 weights_data=config.weights_data, weights_source=weights_source)
        self.projector = Projector(self.backbone.n_feats, dim=config.dim,
                                   projection_type=config.projection_type, dropout=config.dropout)
        self.predictor = PrototypePredictor(config.dim, config.n_clusters)
        self.linear_probe = None
        if config.linear_probe_classes:
            # on a forked RNG, so that adding the probe leaves the other initial weights alone
            with torch.random.fork_rng(devices=[]):
                self.linear_probe = nn.Conv2d(config.dim, int(config.linear_probe_classes), 1)
        self.backbone_precision = str(backbone_precision)
        # torch.compile'd backbone, kept out of the module tree (state dict keys unchanged)
        self._compiled = {}
        self.compile_backbone = bool(compile_backbone)

    @property
    def n_clusters(self):
        return self.config.n_clusters

    @property
    def patch_size(self):
        return self.backbone.patch_size

    # ---- features and code ----
    def _backbone_fn(self):
        if not self.compile_backbone:
            return self.backbone
        if "backbone" not in self._compiled:
            self._compiled["backbone"] = torch.compile(self.backbone)
        return self._compiled["backbone"]

    def features(self, img):
        """Frozen-backbone features B x C x h x w (float32) of normalised images B x 3 x H x W, at
        ``backbone_precision`` (:func:`smooseg.model.backbone.frozen_features`)."""
        return frozen_features(self._backbone_fn(), img, self.backbone_precision)

    def code(self, img):
        """Projector code B x D x h x w of normalised images."""
        return self.projector(self.features(img))[1]

    def predict_code(self, img, flip=False):
        """Code for prediction; with ``flip`` the average of code(x) and flip(code(flip(x)))."""
        code = self.code(img)
        if flip:
            code = (code + self.code(img.flip(-1)).flip(-1)) / 2
        return code

    # ---- prediction ----
    def log_probs_at(self, code):
        """Cluster log-probabilities log_softmax(2 T) of a code already at the output size."""
        return torch.log_softmax(2 * self.predictor.teacher_logits(code), dim=1)

    def cluster_log_probs(self, code, size):
        """Cluster log-probabilities B x K x H x W of a code upsampled bilinearly to ``size``."""
        return self.log_probs_at(F.interpolate(code, size=tuple(size), mode="bilinear", align_corners=False))

    def linear_log_probs(self, code, size):
        """Linear-probe class log-probabilities B x n_classes x H x W: the probe's logits of ``code``
        upsampled bilinearly to ``size`` (STEGO's linear probe)."""
        logits = F.interpolate(self.linear_probe(code), size=tuple(size), mode="bilinear",
                               align_corners=False)
        return torch.log_softmax(logits.float(), dim=1)

    def forward(self, img, size=None, flip=False):
        """Cluster log-probabilities B x K x H x W at ``size`` (default: the image size)."""
        size = tuple(img.shape[-2:]) if size is None else tuple(size)
        return self.cluster_log_probs(self.predict_code(img, flip), size)

    def predict(self, img, size=None, flip=False):
        """Cluster index map B x H x W (no CRF)."""
        return self(img, size, flip).argmax(1)
