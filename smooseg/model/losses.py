"""The SmooSeg objective (docs/method.md §4) as named terms: intra-image smoothness, inter-image
smoothness and the teacher-student data loss, each a pure function of tensors.

Every term is registered under a name with :func:`loss_term`; :class:`LossConfig` weights them
(``weights``: name -> weight, the method's three at 1) and :func:`total_loss` returns each weighted
term by name plus their sum, ``total``. A new term is one decorated function and one weight
(docs/extending.md). Correlations and assignments are computed in float32, also under autocast.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from smooseg.errors import SmoosegError
from smooseg.runtime import fp32_region

LOSS_TERMS: dict[str, Callable] = {}


def loss_term(name):
    """Register ``fn(inputs: LossInputs) -> scalar tensor`` as the loss term ``name``."""

    def register(fn):
        if name in LOSS_TERMS and LOSS_TERMS[name] is not fn:
            raise SmoosegError(f"a loss term named {name!r} is already registered; choose another name")
        LOSS_TERMS[name] = fn
        return fn

    return register


def method_weights():
    """The method's terms, each weighted 1 (docs/method.md §4)."""
    return {"intra": 1.0, "inter": 1.0, "data": 1.0}


@dataclass
class LossConfig:
    """The loss settings (docs/method.md section 4), the teacher's EMA decay (section 3) and the
    weight of each registered term (a term left out, or weighted 0, is not computed). Each field's
    metadata is its allowed range, which the settings check (smooseg/settings.py)."""

    temperature: float = field(default=0.1, metadata={"above": 0.0})  # τ of the soft assignments
    ema_alpha: float = field(default=0.998, metadata={"low": 0.0, "high": 1.0})  # teacher EMA decay α
    pos_intra_shift: float = -0.02          # shift of the intra-image smoothness term
    neg_inter_shift: float = 0.5            # shift of the inter-image smoothness term
    pointwise: bool = True                  # pointwise centring of the feature correlation
    weights: dict[str, float] = field(default_factory=method_weights)  # term name -> weight
                                            # ('+loss.weights.<term>=w' adds a registered term)

    def __post_init__(self):
        unknown = [name for name in self.weights if name not in LOSS_TERMS]
        if unknown:
            raise SmoosegError(f"loss.weights.{unknown[0]} names no loss term; the terms are "
                               f"{', '.join(LOSS_TERMS)} "
                               "(register new ones with smooseg.model.losses.loss_term)")


@dataclass(frozen=True)
class LossInputs:
    """What a loss term may read: the projector's smoothness ``signal`` (B×C×h×w), the student and
    teacher cluster logits (B×K×h×w), the teacher's soft ``assignment`` Q = softmax(T/τ), the image
    ``pairing`` π of the inter-image term and the settings."""

    signal: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    assignment: torch.Tensor
    pairing: torch.Tensor
    config: LossConfig


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


def smoothness_term(f1, q1, f2, q2, shift, pointwise=True):
    """mean over b, i, j of (F − shift)·Dq: F the (pointwise-centred) feature correlation of ``f1``
    with ``f2`` (no gradient), Dq the assignment distance of ``q1`` to ``q2`` (docs/method.md §4)."""
    corr = feature_correlation(f1, f2)
    if pointwise:
        corr = pointwise_centre(corr)
    with fp32_region(q1.device):
        return ((corr - shift) * assignment_distance(q1, q2)).mean()


def random_pairing(batch_size, generator=None):
    """Random index map π over the batch with π(b) ≠ b (fixed points of a permutation go to b+1 mod B)."""
    if batch_size < 2:
        raise SmoosegError(
            f"batch size is {batch_size}; the batch size must be >= 2 for the inter-image term, "
            "raise batch_size"
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


@torch.no_grad()
def smoothness_parts(signal, teacher_logits, temperature=0.1, pointwise=True, pairing=None):
    """The B×N×N tensors inside the two smoothness terms (for inspection, no gradient).

    Returns dict(intra_similarity, intra_distance, inter_similarity, inter_distance): the
    (pointwise-centred) feature similarity F and the assignment distance Dq of each term, so that
    :func:`total_loss` gives intra = mean((intra_similarity − pos_intra_shift) · intra_distance)
    and likewise inter with ``neg_inter_shift``, for the same ``pairing``.
    """
    pairing = _checked_pairing(signal, teacher_logits, pairing)
    assignment = soft_assignment(teacher_logits, temperature)
    parts = {}
    for term, other in (("intra", slice(None)), ("inter", pairing)):
        similarity = feature_correlation(signal, signal[other])
        parts[f"{term}_similarity"] = pointwise_centre(similarity) if pointwise else similarity
        parts[f"{term}_distance"] = assignment_distance(assignment, assignment[other])
    return parts


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


@loss_term("intra")
def intra_image_smoothness(x: LossInputs):
    """Within each image: pixel pairs whose features correlate above ``pos_intra_shift`` are pulled
    towards the same clusters, the others pushed apart."""
    return smoothness_term(x.signal, x.assignment, x.signal, x.assignment, x.config.pos_intra_shift,
                           x.config.pointwise)


@loss_term("inter")
def inter_image_smoothness(x: LossInputs):
    """Across images: each image against its partner π(b), with the shift ``neg_inter_shift``."""
    return smoothness_term(x.signal, x.assignment, x.signal[x.pairing], x.assignment[x.pairing],
                           x.config.neg_inter_shift, x.config.pointwise)


@loss_term("data")
def teacher_student(x: LossInputs):
    """The student learns the teacher's argmax cluster of every pixel (:func:`data_loss`)."""
    return data_loss(x.student_logits, x.teacher_logits)


def total_loss(signal, student_logits, teacher_logits, config: LossConfig | None = None, pairing=None):
    """Each weighted term of ``config.weights`` by name (weight × term; a weight of 0 skips the
    term) and their sum ``total``; ``config`` None is ``LossConfig()``. ``pairing`` (LongTensor[B])
    pairs image b with image pairing[b] for the inter-image term; drawn with :func:`random_pairing`
    when None."""
    config = LossConfig() if config is None else config
    pairing = _checked_pairing(signal, teacher_logits, pairing)
    with fp32_region(signal.device):
        inputs = LossInputs(signal, student_logits, teacher_logits,
                            soft_assignment(teacher_logits, config.temperature), pairing, config)
        terms = {name: weight * LOSS_TERMS[name](inputs) for name, weight in config.weights.items() if weight}
    return dict(terms, total=sum(terms.values()))
