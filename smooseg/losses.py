"""SmooSeg losses (SPEC §4): smoothness (intra- and inter-image) plus the teacher-student data loss.

Pure functions of tensors. Correlations and assignments are computed in float32, also under autocast.
"""

import torch
import torch.nn.functional as F

from smooseg.errors import SmoosegError
from smooseg.heads import fp32_region


def _unit_columns(x):
    """B×C×h×w -> B×C×N in float32, each column (pixel) L2-normalised over C."""
    return F.normalize(x.float().flatten(2), dim=1)


def _pairwise_cosine(u1, u2):
    """B×C×N1, B×C×N2 of unit columns -> B×N1×N2 cosine similarities."""
    return torch.bmm(u1.transpose(1, 2), u2)


def feature_correlation(f1, f2):
    """Cosine similarity of every pixel of ``f1`` with every pixel of ``f2``: B×N1×N2, no gradient."""
    with torch.no_grad(), fp32_region(f1.device):
        return _pairwise_cosine(_unit_columns(f1), _unit_columns(f2))


def pointwise_centre(corr):
    """Centre each row of B×N1×N2 ``corr`` over j, then restore the original global mean."""
    old_mean = corr.mean()
    corr = corr - corr.mean(dim=-1, keepdim=True)
    return corr - corr.mean() + old_mean


def assignment_distance(q1, q2):
    """1 − cosine between the K-vectors of every pixel pair: B×N1×N2."""
    with fp32_region(q1.device):
        return 1.0 - _pairwise_cosine(_unit_columns(q1), _unit_columns(q2))


def _term_from_units(uf1, uq1, uf2, uq2, shift, pointwise):
    """Smoothness term from already flattened, normalised features and assignments."""
    with torch.no_grad():
        corr = _pairwise_cosine(uf1, uf2)
        if pointwise:
            corr = pointwise_centre(corr)
    dist = 1.0 - _pairwise_cosine(uq1, uq2)
    return ((corr - shift) * dist).mean()


def smoothness_term(f1, q1, f2, q2, shift, pointwise=True):
    """mean over b, i, j of (F − shift)·Dq for feature maps f1, f2 and assignments q1, q2."""
    with fp32_region(f1.device):
        return _term_from_units(
            _unit_columns(f1.detach()), _unit_columns(q1), _unit_columns(f2.detach()), _unit_columns(q2),
            shift, pointwise,
        )


def random_pairing(batch_size, generator=None):
    """Random index map π over the batch with π(b) ≠ b (fixed points of a permutation go to b+1 mod B)."""
    if batch_size < 2:
        raise SmoosegError(
            f"batch size is {batch_size}; the batch size must be >= 2 for the inter-image term, raise batch_size"
        )
    perm = torch.randperm(batch_size, generator=generator)
    idx = torch.arange(batch_size)
    return torch.where(perm == idx, (idx + 1) % batch_size, perm)


def soft_assignment(teacher_logits, temperature=0.1):
    """Q = softmax(T / τ) over the cluster dimension, in float32."""
    with fp32_region(teacher_logits.device):
        return torch.softmax(teacher_logits.float() / temperature, dim=1)


def smoothness_loss(signal, teacher_logits, pos_intra_shift, neg_inter_shift,
                    temperature=0.1, pointwise=True, pairing=None):
    """Intra-image plus inter-image smoothness; returns dict(intra, inter, total).

    ``pairing`` (LongTensor[B]) pairs image b with image pairing[b]; drawn with
    :func:`random_pairing` when None.
    """
    if signal.shape[0] != teacher_logits.shape[0] or signal.shape[2:] != teacher_logits.shape[2:]:
        raise SmoosegError(
            f"signal {tuple(signal.shape)} and teacher logits {tuple(teacher_logits.shape)} must share batch "
            "and spatial size; pass the projector signal and logits of the same batch"
        )
    if pairing is None:
        pairing = random_pairing(signal.shape[0])
    pairing = pairing.to(signal.device)
    with fp32_region(signal.device):
        uf = _unit_columns(signal.detach())
        uq = _unit_columns(soft_assignment(teacher_logits, temperature))
        intra = _term_from_units(uf, uq, uf, uq, pos_intra_shift, pointwise)
        inter = _term_from_units(uf, uq, uf[pairing], uq[pairing], neg_inter_shift, pointwise)
    return {"intra": intra, "inter": inter, "total": intra + inter}


def data_loss(student_logits, teacher_logits):
    """Cross-entropy of the raw student logits against the teacher's argmax cluster, mean over pixels."""
    with fp32_region(student_logits.device):
        target = teacher_logits.detach().argmax(dim=1)
        return F.cross_entropy(student_logits.float(), target)


def total_loss(signal, student_logits, teacher_logits, pos_intra_shift, neg_inter_shift,
               temperature=0.1, pointwise=True, pairing=None):
    """Smoothness + data loss; returns dict(intra, inter, smooth, data, total)."""
    smooth = smoothness_loss(signal, teacher_logits, pos_intra_shift, neg_inter_shift,
                             temperature=temperature, pointwise=pointwise, pairing=pairing)
    data = data_loss(student_logits, teacher_logits)
    return {
        "intra": smooth["intra"],
        "inter": smooth["inter"],
        "smooth": smooth["total"],
        "data": data,
        "total": smooth["total"] + data,
    }
