"""SmooSeg losses (docs/method.md §4): smoothness (intra- and inter-image) plus the teacher-student data loss.

Pure functions of tensors. Correlations and assignments are computed in float32, also under autocast.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smooseg.errors import SmoosegError
from smooseg.runtime import fp32_region


@dataclass(frozen=True)
class LossConfig:
    """The loss settings (docs/method.md section 4) and the teacher's EMA decay (section 3)."""

    temperature: float = 0.1
    ema_alpha: float = 0.998
    pos_intra_shift: float = -0.02
    neg_inter_shift: float = 0.5
    pointwise: bool = True


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


def _similarity_and_distance(uf1, uq1, uf2, uq2, pointwise):
    """(F, Dq) of one smoothness term from flattened unit features and assignments; F has no gradient."""
    with torch.no_grad():
        corr = _pairwise_cosine(uf1, uf2)
        if pointwise:
            corr = pointwise_centre(corr)
    return corr, 1.0 - _pairwise_cosine(uq1, uq2)


def _term_from_units(uf1, uq1, uf2, uq2, shift, pointwise):
    """Smoothness term from already flattened, normalised features and assignments."""
    corr, dist = _similarity_and_distance(uf1, uq1, uf2, uq2, pointwise)
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


def _checked_pairing(signal, teacher_logits, pairing):
    """Check that signal and logits belong together; the pairing on their device (drawn when None)."""
    if signal.shape[0] != teacher_logits.shape[0] or signal.shape[2:] != teacher_logits.shape[2:]:
        raise SmoosegError(
            f"signal {tuple(signal.shape)} and teacher logits {tuple(teacher_logits.shape)} must share batch "
            "and spatial size; pass the projector signal and logits of the same batch"
        )
    if pairing is None:
        pairing = random_pairing(signal.shape[0])
    return pairing.to(signal.device)


def smoothness_loss(signal, teacher_logits, pos_intra_shift, neg_inter_shift,
                    temperature=0.1, pointwise=True, pairing=None):
    """Intra-image plus inter-image smoothness; returns dict(intra, inter, total).

    ``pairing`` (LongTensor[B]) pairs image b with image pairing[b]; drawn with
    :func:`random_pairing` when None.
    """
    pairing = _checked_pairing(signal, teacher_logits, pairing)
    with fp32_region(signal.device):
        uf = _unit_columns(signal.detach())
        uq = _unit_columns(soft_assignment(teacher_logits, temperature))
        intra = _term_from_units(uf, uq, uf, uq, pos_intra_shift, pointwise)
        inter = _term_from_units(uf, uq, uf[pairing], uq[pairing], neg_inter_shift, pointwise)
    return {"intra": intra, "inter": inter, "total": intra + inter}


@torch.no_grad()
def smoothness_parts(signal, teacher_logits, temperature=0.1, pointwise=True, pairing=None):
    """The B×N×N tensors inside the two smoothness terms (for inspection, no gradient).

    Returns dict(intra_similarity, intra_distance, inter_similarity, inter_distance): the
    (pointwise-centred) feature similarity F and the assignment distance Dq of each term, so that
    ``smoothness_loss`` gives intra = mean((intra_similarity − pos_intra_shift) · intra_distance)
    and likewise inter with ``neg_inter_shift``, for the same ``pairing``.
    """
    pairing = _checked_pairing(signal, teacher_logits, pairing)
    with fp32_region(signal.device):
        uf = _unit_columns(signal)
        uq = _unit_columns(soft_assignment(teacher_logits, temperature))
        intra = _similarity_and_distance(uf, uq, uf, uq, pointwise)
        inter = _similarity_and_distance(uf, uq, uf[pairing], uq[pairing], pointwise)
    return {"intra_similarity": intra[0], "intra_distance": intra[1],
            "inter_similarity": inter[0], "inter_distance": inter[1]}


def _sample_index(n, max_values, generator, device):
    """None (keep all n) or ``max_values`` uniform indices into n (with replacement).

    Drawn on the CPU with ``generator`` (None: the global one), so a seeded generator leaves the
    training random state untouched.
    """
    if n <= max_values:
        return None
    return torch.randint(n, (int(max_values),), generator=generator).to(device)


def shift_histograms(parts, pos_intra_shift, neg_inter_shift, max_values=100_000, generator=None):
    """Histogram inputs from :func:`smoothness_parts`: (values, attract_fractions).

    values: 1-D samples (at most ``max_values`` each, the same pixel pairs for all three of a
    term) named ``<term>_similarity`` (F), ``<term>_weight`` (F − shift) and ``<term>_distance``
    (Dq) for the terms intra and inter. attract_fractions: dict(intra=, inter=), the share of ALL
    pairs with F − shift > 0, i.e. of pairs whose assignments the loss pulls together.
    """
    values, fractions = {}, {}
    for term, shift in (("intra", pos_intra_shift), ("inter", neg_inter_shift)):
        similarity = parts[f"{term}_similarity"].reshape(-1)
        distance = parts[f"{term}_distance"].reshape(-1)
        fractions[term] = (similarity > shift).float().mean()
        index = _sample_index(similarity.numel(), max_values, generator, similarity.device)
        if index is not None:
            similarity, distance = similarity[index], distance[index]
        values[f"{term}_similarity"] = similarity
        values[f"{term}_weight"] = similarity - shift
        values[f"{term}_distance"] = distance
    return values, fractions


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
