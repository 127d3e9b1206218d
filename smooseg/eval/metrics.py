"""Unsupervised segmentation metrics (docs/method.md §6): cluster/class confusion, Hungarian matching, IoU."""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

from smooseg.errors import SmoosegError


def _as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def hungarian_match(confusion):
    """Cluster index for each class, maximising the total matched count of a K×n confusion (K >= n)."""
    m = _as_numpy(confusion)
    n_clusters, n_classes = m.shape
    if n_clusters < n_classes:
        raise SmoosegError(
            f"{n_clusters} clusters cannot be matched to {n_classes} classes; set extra_clusters >= 0 "
            "so that n_clusters >= n_classes"
        )
    rows, cols = linear_sum_assignment(m, maximize=True)
    assignment = np.empty(n_classes, dtype=np.int64)
    assignment[cols] = rows
    return assignment


def scores(confusion, assignment):
    """IoU per class, mIoU (mean of the defined IoUs) and pixel Accuracy, all ×100.

    For class c matched to cluster k: tp = M[k, c], fp = row k sum − tp, fn = column c sum − tp.
    IoU is NaN where tp + fp + fn = 0; Accuracy = Σ tp / Σ M.
    """
    m = _as_numpy(confusion).astype(np.float64)
    assignment = _as_numpy(assignment).astype(np.int64)
    classes = np.arange(m.shape[1])
    tp = m[assignment, classes]
    fp = m.sum(axis=1)[assignment] - tp
    fn = m.sum(axis=0) - tp
    denom = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean() * 100) if defined.any() else float("nan")
    total = m.sum()
    accuracy = float(tp.sum() / total * 100) if total > 0 else float("nan")
    return {"mIoU": miou, "Accuracy": accuracy, "iou": torch.from_numpy(iou * 100)}


def cluster_to_class_map(assignment, n_clusters):
    """LongTensor[K]: the class matched to each cluster, −1 for unmatched clusters."""
    assignment = torch.as_tensor(_as_numpy(assignment), dtype=torch.long)
    mapping = torch.full((n_clusters,), -1, dtype=torch.long)
    mapping[assignment] = torch.arange(assignment.numel())
    return mapping


MATCHES = ("hungarian", "identity")


class ClusterMetrics(Metric):
    """Accumulates a K×n_classes confusion of (cluster, label) pixel counts; matches clusters at compute.

    Labels outside [0, n_classes) (e.g. −1) are ignored. With ``mask_extra_clusters`` (reference
    quirk) pixels predicted as a cluster >= n_classes are dropped too; otherwise they count as errors.
    ``match="hungarian"`` matches clusters to classes at compute; ``match="identity"`` takes cluster
    c as class c (supervised predictions such as the linear probe's).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n_classes, n_clusters, mask_extra_clusters=False, match="hungarian", **kwargs):
        super().__init__(**kwargs)
        if match not in MATCHES:
            raise SmoosegError(f"match={match!r} is unknown; use one of {', '.join(MATCHES)}")
        self.match = match
        if n_clusters < n_classes:
            raise SmoosegError(
                f"n_clusters={n_clusters} < n_classes={n_classes}; extra_clusters must be >= 0"
            )
        self.n_classes = n_classes
        self.n_clusters = n_clusters
        self.mask_extra_clusters = mask_extra_clusters
        self.add_state(
            "confusion", default=torch.zeros(n_clusters, n_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds, target):
        """Add the pixels of cluster predictions ``preds`` against labels ``target`` (same shape)."""
        if preds.shape != target.shape:
            raise SmoosegError(
                f"metric predictions {tuple(preds.shape)} and labels {tuple(target.shape)} differ in shape; "
                "resize predictions to the label size"
            )
        preds = preds.reshape(-1).long()
        target = target.reshape(-1).long()
        if preds.numel() and bool(((preds < 0) | (preds >= self.n_clusters)).any()):
            raise SmoosegError(
                f"cluster predictions must lie in [0, {self.n_clusters}); check n_clusters / extra_clusters"
            )
        keep = (target >= 0) & (target < self.n_classes)
        if self.mask_extra_clusters:
            keep &= preds < self.n_classes
        flat = preds[keep] * self.n_classes + target[keep]
        counts = torch.bincount(flat, minlength=self.n_clusters * self.n_classes)
        self.confusion += counts.reshape(self.n_clusters, self.n_classes)

    def compute(self):
        """dict(mIoU, Accuracy, iou, assignment, confusion) from the accumulated counts."""
        confusion = self.confusion.detach().cpu()
        if self.match == "identity":
            assignment = torch.arange(self.n_classes)
        else:
            assignment = torch.from_numpy(hungarian_match(confusion.numpy()))
        result = scores(confusion.numpy(), assignment.numpy())
        result["assignment"] = assignment
        result["confusion"] = confusion
        return result
