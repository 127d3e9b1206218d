"""Trainable heads on top of the frozen backbone: the projector and the prototype predictor."""

import torch
import torch.nn.functional as F
from torch import nn

from smooseg.errors import SmoosegError
from smooseg.runtime import fp32_region

PROJECTION_TYPES = ("nonlinear", "linear")


class Projector(nn.Module):
    """Maps backbone features B×C×h×w to codes B×D×h×w (docs/method.md §2).

    With ``dropout`` on, a fresh Dropout2d mask is drawn for each use: the linear branch input,
    the nonlinear branch input and the returned signal. The signal feeds the smoothness loss.
    """

    def __init__(self, n_feats, dim=64, projection_type="nonlinear", dropout=True, dropout_p=0.2):
        super().__init__()
        if projection_type not in PROJECTION_TYPES:
            raise SmoosegError(
                f"projection_type={projection_type!r} is unknown; use one of {', '.join(PROJECTION_TYPES)}"
            )
        self.n_feats = n_feats
        self.dim = dim
        self.projection_type = projection_type
        self.drop = nn.Dropout2d(p=dropout_p) if dropout else nn.Identity()
        self.linear = nn.Conv2d(n_feats, dim, 1)
        if projection_type == "nonlinear":
            self.nonlinear = nn.Sequential(
                nn.Conv2d(n_feats, n_feats, 1), nn.SiLU(), nn.Conv2d(n_feats, dim, 1)
            )
        else:
            self.nonlinear = None

    def forward(self, feats):
        """Return ``(signal, code)``: signal = drop(feats) (or feats without dropout), code B×D×h×w."""
        code = self.linear(self.drop(feats))
        if self.nonlinear is not None:
            code = code + self.nonlinear(self.drop(feats))
        return self.drop(feats), code


class PrototypePredictor(nn.Module):
    """Student/teacher cluster prototypes and the cosine logits they give (docs/method.md §3).

    Logits are computed in float32, also under autocast.
    """

    def __init__(self, dim, n_clusters):
        super().__init__()
        student = torch.empty(n_clusters, dim)
        nn.init.xavier_normal_(student)
        student = F.normalize(student, dim=1)
        self.student = nn.Parameter(student)
        self.register_buffer("teacher", student.clone(), persistent=True)

    @staticmethod
    def _cosine_logits(code, prototypes, norms):
        """Cosine similarity B×K×h×w: unit prototypes · code, divided by the code's norms.

        Dividing the K dot products costs less than normalising the D-channel code first, and a
        matmul beats einsum's strided path (several times on CPU at full resolution).
        """
        b, d, h, w = code.shape
        unit_protos = F.normalize(prototypes.float(), dim=1)
        dots = torch.matmul(unit_protos, code.reshape(b, d, h * w)).view(b, -1, h, w)
        return dots / norms

    @staticmethod
    def _norms(code):
        """Per-position L2 norms B×1×h×w of the code, floored like F.normalize (1e-12)."""
        return code.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)

    def forward(self, code):
        """Return ``(student_logits, teacher_logits)``, both B×K×h×w.

        Student logits use a detached code (gradients reach the student prototypes only);
        teacher logits use detached teacher prototypes (gradients reach the code only).
        """
        with fp32_region(code.device):
            code = code.float()
            norms = self._norms(code)
            student = self._cosine_logits(code.detach(), self.student, norms.detach())
            teacher = self._cosine_logits(code, self.teacher.detach(), norms)
        return student, teacher

    def teacher_logits(self, code):
        """Teacher logits B×K×h×w alone (used for prediction)."""
        with fp32_region(code.device):
            code = code.float()
            return self._cosine_logits(code, self.teacher.detach(), self._norms(code))

    @torch.no_grad()
    def ema_update(self, alpha=0.998):
        """teacher ← α·teacher + (1−α)·student.

        Reference quirk: the student enters un-normalised; rows are normalised only when used.
        """
        if not 0.0 <= alpha <= 1.0:
            raise SmoosegError(f"ema alpha={alpha} is outside [0, 1]; "
                               "set the EMA decay (alpha) to e.g. 0.998")
        self.teacher.mul_(alpha).add_(self.student.detach().to(self.teacher.dtype), alpha=1.0 - alpha)
