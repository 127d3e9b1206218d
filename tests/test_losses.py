"""Loss terms against plain-python hand computations on tiny inputs."""

import math

import pytest
import torch

from smooseg.errors import SmoosegError
from smooseg.model.losses import (
    LOSS_TERMS,
    LossConfig,
    assignment_distance,
    data_loss,
    feature_correlation,
    loss_term,
    pointwise_centre,
    random_pairing,
    smoothness_term,
    total_loss,
)

# ---- plain-python references: maps are nested lists [b][c][pixel] -------------------------------


def pixels(x):
    """[b][c][p] -> [b][p][c]."""
    return [[[x[b][c][p] for c in range(len(x[b]))] for p in range(len(x[b][0]))] for b in range(len(x))]


def cos(u, v):
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def ref_corr(x1, x2):
    p1, p2 = pixels(x1), pixels(x2)
    return [[[cos(u, v) for v in p2[b]] for u in p1[b]] for b in range(len(p1))]


def ref_centre(corr):
    flat = [v for mat in corr for row in mat for v in row]
    m = sum(flat) / len(flat)
    rows = [[[v - sum(row) / len(row) for v in row] for row in mat] for mat in corr]
    flat = [v for mat in rows for row in mat for v in row]
    m2 = sum(flat) / len(flat)
    return [[[v - m2 + m for v in row] for row in mat] for mat in rows]


def ref_term(f1, q1, f2, q2, shift, pointwise=True):
    corr = ref_corr(f1, f2)
    if pointwise:
        corr = ref_centre(corr)
    dq = ref_corr(q1, q2)
    total, n = 0.0, 0
    for b in range(len(corr)):
        for i in range(len(corr[b])):
            for j in range(len(corr[b][i])):
                total += (corr[b][i][j] - shift) * (1 - dq[b][i][j])
                n += 1
    return total / n


def ref_softmax(logits, tau):
    """[b][k][p] -> softmax over k of logits / tau."""
    out = []
    for mat in logits:
        k, n = len(mat), len(mat[0])
        cols = []
        for p in range(n):
            e = [math.exp(mat[c][p] / tau) for c in range(k)]
            cols.append([v / sum(e) for v in e])
        out.append([[cols[p][c] for p in range(n)] for c in range(k)])
    return out


def as_map(nested, h, w):
    """[b][c][p] nested list -> tensor B×C×h×w."""
    t = torch.tensor(nested, dtype=torch.float64)
    return t.reshape(t.shape[0], t.shape[1], h, w).float()


F1 = [[[1.0, 1.0, 0.5, -1.0], [0.0, 1.0, 2.0, 0.3], [0.5, -0.2, 1.0, 0.0]]]  # B=1, C=3, 2×2
F2 = [[[0.0, 3.0, 1.0, 1.0], [2.0, 4.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.5]]]
Q1 = [[[0.7, 0.1, 0.3, 0.2], [0.2, 0.8, 0.3, 0.1], [0.1, 0.1, 0.4, 0.7]]]  # K=3
Q2 = [[[0.5, 0.0, 0.9, 0.1], [0.5, 0.2, 0.05, 0.3], [0.0, 0.8, 0.05, 0.6]]]


# ---- individual terms -------------------------------------------------------------------------


def test_feature_correlation_explicit_numbers_and_no_grad():
    f1 = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]], requires_grad=True)  # pixels (1,0), (1,1)
    f2 = torch.tensor([[[[0.0, 3.0]], [[2.0, 4.0]]]])  # pixels (0,2), (3,4)
    corr = feature_correlation(f1, f2)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[[0.0, 0.6], [r, 7 / 5 * r]]])
    torch.testing.assert_close(corr, expected)
    assert corr.shape == (1, 2, 2) and not corr.requires_grad


def test_feature_correlation_rectangular_matches_reference():
    f1 = as_map(F1, 2, 2)
    f2 = as_map([[row[:2] for row in F2[0]]], 1, 2)
    corr = feature_correlation(f1, f2)
    assert corr.shape == (1, 4, 2)
    torch.testing.assert_close(corr, torch.tensor(ref_corr(F1, [[row[:2] for row in F2[0]]])))


def test_pointwise_centre_known_matrix():
    got = pointwise_centre(torch.tensor([[[1.0, 2.0], [3.0, 6.0]]]))
    # mean 3; rows centred -> [[-.5,.5],[-1.5,1.5]] (mean 0); + 3
    torch.testing.assert_close(got, torch.tensor([[[2.5, 3.5], [1.5, 4.5]]]))


def test_pointwise_centre_uses_global_mean_over_batch():
    got = pointwise_centre(torch.tensor([[[0.0, 2.0]], [[4.0, 4.0]]]))
    # global mean 2.5 (a per-image mean would give back [[0,2]] and [[4,4]])
    torch.testing.assert_close(got, torch.tensor([[[1.5, 3.5]], [[2.5, 2.5]]]))


def test_assignment_distance_explicit_numbers():
    q1 = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # pixels (1,0,0), (1,1,0)
    q2 = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]], [[0.0, 1.0]]]])  # pixels (0,1,0), (1,1,1)
    r2, r3 = 1 / math.sqrt(2), 1 / math.sqrt(3)
    expected = torch.tensor([[[1.0, 1 - r3], [1 - r2, 1 - 2 * r2 * r3]]])
    torch.testing.assert_close(assignment_distance(q1, q2), expected)


def test_smoothness_term_explicit_numbers():
    # f pixels (1,0), (0,1): F = identity (unchanged by centring); q pixels (1,0), (0,1): Dq = 1 − I.
    f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    # mean of (F − s)·Dq = (0 + (−s) + (−s) + 0) / 4 = −s/2
    torch.testing.assert_close(smoothness_term(f, q, f, q, 0.2), torch.tensor(-0.1))
    torch.testing.assert_close(smoothness_term(f, q, f, q, -0.3, pointwise=False), torch.tensor(0.15))


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("shift", [0.0, -0.02, 0.48])
def test_smoothness_term_matches_reference(pointwise, shift):
    got = smoothness_term(as_map(F1, 2, 2), as_map(Q1, 2, 2), as_map(F2, 2, 2), as_map(Q2, 2, 2), shift,
                          pointwise)
    expected = ref_term(F1, Q1, F2, Q2, shift, pointwise)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_pointwise_changes_the_term():
    a = smoothness_term(as_map(F1, 2, 2), as_map(Q1, 2, 2), as_map(F2, 2, 2), as_map(Q2, 2, 2), 0.1, True)
    b = smoothness_term(as_map(F1, 2, 2), as_map(Q1, 2, 2), as_map(F2, 2, 2), as_map(Q2, 2, 2), 0.1, False)
    assert abs(a.item() - b.item()) > 1e-3


# ---- pairing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7])
def test_random_pairing_has_no_fixed_points(batch_size):
    seen = set()
    for seed in range(200):
        pi = random_pairing(batch_size, generator=torch.Generator().manual_seed(seed))
        assert pi.dtype == torch.long and pi.shape == (batch_size,)
        assert ((pi >= 0) & (pi < batch_size)).all()
        assert (pi != torch.arange(batch_size)).all()
        seen.add(tuple(pi.tolist()))
    if batch_size == 2:
        assert seen == {(1, 0)}
    else:
        assert len(seen) > 1


def test_random_pairing_fixed_points_go_to_next_index():
    # Find a seed whose permutation has a fixed point and check the replacement rule.
    for seed in range(100):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        fixed = (perm == torch.arange(5)).nonzero().flatten().tolist()
        if fixed:
            break
    pi = random_pairing(5, generator=torch.Generator().manual_seed(seed))
    for b in range(5):
        assert pi[b].item() == ((b + 1) % 5 if b in fixed else perm[b].item())


def test_random_pairing_rejects_batch_of_one():
    with pytest.raises(SmoosegError, match="batch size must be >= 2"):
        random_pairing(1)


# ---- combined losses --------------------------------------------------------------------------

SIGNAL = [  # B=2, C=3, h×w = 1×2
    [[1.0, 0.5], [0.0, 1.0], [2.0, -1.0]],
    [[0.3, -0.4], [1.0, 1.0], [0.0, 0.5]],
]
TEACHER = [  # B=2, K=2, cosine logits
    [[0.2, -0.1], [0.5, 0.3]],
    [[0.9, 0.0], [-0.3, 0.1]],
]
STUDENT = [
    [[0.4, 0.1], [-0.2, 0.6]],
    [[0.0, 0.7], [0.3, -0.5]],
]


def smoothness_only(pos_intra_shift, neg_inter_shift, temperature=0.1):
    """Loss settings that weight the two smoothness terms only."""
    return LossConfig(temperature=temperature, pos_intra_shift=pos_intra_shift,
                      neg_inter_shift=neg_inter_shift, weights={"intra": 1.0, "inter": 1.0})


def shifts(pos_intra_shift, neg_inter_shift, **options):
    return LossConfig(pos_intra_shift=pos_intra_shift, neg_inter_shift=neg_inter_shift, **options)


def test_smoothness_loss_intra_inter_with_fixed_pairing():
    tau = 0.1
    q = ref_softmax(TEACHER, tau)
    pi = [1, 0]
    exp_intra = ref_term(SIGNAL, q, SIGNAL, q, -0.02)
    exp_inter = ref_term(SIGNAL, q, [SIGNAL[p] for p in pi], [q[p] for p in pi], 0.48)
    out = total_loss(as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2),
                     smoothness_only(-0.02, 0.48, temperature=tau), pairing=torch.tensor(pi))
    assert set(out) == {"intra", "inter", "total"}
    assert out["intra"].item() == pytest.approx(exp_intra, abs=1e-6)
    assert out["inter"].item() == pytest.approx(exp_inter, abs=1e-6)
    assert out["total"].item() == pytest.approx(exp_intra + exp_inter, abs=1e-6)


def test_smoothness_loss_temperature_matters_and_random_pairing_used_by_default():
    sig, s, t = as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2)
    a = total_loss(sig, s, t, smoothness_only(0.0, 0.5, temperature=0.1))
    b = total_loss(sig, s, t, smoothness_only(0.0, 0.5, temperature=1.0))
    assert a["intra"].item() != pytest.approx(b["intra"].item(), abs=1e-4)
    fixed = total_loss(sig, s, t, smoothness_only(0.0, 0.5, temperature=0.1), pairing=torch.tensor([1, 0]))
    torch.testing.assert_close(a["inter"], fixed["inter"])  # B=2: the only valid pairing


def test_smoothness_loss_shape_mismatch():
    with pytest.raises(SmoosegError, match="spatial size"):
        total_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 1, 2), torch.randn(2, 4, 1, 2))


def test_data_loss_two_pixels():
    s = torch.tensor([[[[0.5, 0.3]], [[-0.2, 0.9]]]], requires_grad=True)  # pixels (0.5,-0.2), (0.3,0.9)
    t = torch.tensor([[[[0.1, 0.7]], [[0.3, -0.1]]]])  # argmax: pixel0 -> 1, pixel1 -> 0
    l0 = -math.log(math.exp(-0.2) / (math.exp(0.5) + math.exp(-0.2)))
    l1 = -math.log(math.exp(0.3) / (math.exp(0.3) + math.exp(0.9)))
    got = data_loss(s, t)
    assert got.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    got.backward()
    assert s.grad.abs().sum() > 0


def test_total_loss_is_sum():
    sig, s, t = as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2)
    out = total_loss(sig, s, t, shifts(-0.02, 0.48, temperature=0.1), pairing=torch.tensor([1, 0]))
    q = ref_softmax(TEACHER, 0.1)
    intra = ref_term(SIGNAL, q, SIGNAL, q, -0.02)
    inter = ref_term(SIGNAL, q, [SIGNAL[1], SIGNAL[0]], [q[1], q[0]], 0.48)
    ce = []
    for b in range(2):
        for p in range(2):
            target = max(range(2), key=lambda k: TEACHER[b][k][p])
            logits = [STUDENT[b][k][p] for k in range(2)]
            ce.append(-logits[target] + math.log(sum(math.exp(v) for v in logits)))
    data = sum(ce) / len(ce)
    assert out["intra"].item() == pytest.approx(intra, abs=1e-6)
    assert out["inter"].item() == pytest.approx(inter, abs=1e-6)
    assert list(out) == ["intra", "inter", "data", "total"]
    assert out["data"].item() == pytest.approx(data, abs=1e-6)
    assert out["total"].item() == pytest.approx(intra + inter + data, abs=1e-6)


def test_losses_float32_under_autocast():
    sig, s, t = as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2)
    ref = total_loss(sig, s, t, shifts(-0.02, 0.48), pairing=torch.tensor([1, 0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = total_loss(sig.bfloat16(), s, t, shifts(-0.02, 0.48), pairing=torch.tensor([1, 0]))
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["data"], ref["data"])


# ---- named, weighted terms --------------------------------------------------------------------


def test_weights_scale_each_term_and_a_zero_weight_skips_it():
    sig, s, t = as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2)
    pairing = torch.tensor([1, 0])
    base = total_loss(sig, s, t, shifts(-0.02, 0.48), pairing=pairing)
    out = total_loss(sig, s, t, shifts(-0.02, 0.48, weights={"intra": 2.0, "inter": 0.0, "data": 0.5}),
                     pairing=pairing)
    assert list(out) == ["intra", "data", "total"]
    torch.testing.assert_close(out["intra"], 2.0 * base["intra"])
    torch.testing.assert_close(out["data"], 0.5 * base["data"])
    torch.testing.assert_close(out["total"], 2.0 * base["intra"] + 0.5 * base["data"])


def test_a_registered_term_is_computed_weighted_and_summed():
    @loss_term("test_mean_student")
    def mean_student(x):
        return x.student_logits.float().mean()

    try:
        sig, s, t = as_map(SIGNAL, 1, 2), as_map(STUDENT, 1, 2), as_map(TEACHER, 1, 2)
        weights = {"intra": 1.0, "inter": 1.0, "data": 1.0, "test_mean_student": 3.0}
        out = total_loss(sig, s, t, shifts(-0.02, 0.48, weights=weights), pairing=torch.tensor([1, 0]))
        mean = sum(v for image in STUDENT for row in image for v in row) / 8
        assert out["test_mean_student"].item() == pytest.approx(3.0 * mean, abs=1e-6)
        parts = out["intra"] + out["inter"] + out["data"] + out["test_mean_student"]
        torch.testing.assert_close(out["total"], parts)
    finally:
        del LOSS_TERMS["test_mean_student"]


def test_an_unknown_weight_name_is_one_clear_error():
    with pytest.raises(SmoosegError,
                       match=r"loss.weights.entropy names no loss term; the terms are intra, inter, data"):
        LossConfig(weights={"intra": 1.0, "entropy": 0.1})


def test_a_name_is_registered_once():
    with pytest.raises(SmoosegError, match="already registered"):
        loss_term("intra")(lambda x: x.signal.sum())
