import math

import pytest
import torch
import torch.nn.functional as F

from smooseg.errors import SmoosegError
from smooseg.model.heads import Projector, PrototypePredictor
from smooseg.model.losses import LossConfig, total_loss


def test_projector_shapes_and_branches():
    feats = torch.randn(2, 6, 3, 4)
    proj = Projector(6, dim=5)
    signal, code = proj(feats)
    assert signal.shape == (2, 6, 3, 4)
    assert code.shape == (2, 5, 3, 4)
    assert isinstance(proj.linear, torch.nn.Conv2d) and proj.linear.kernel_size == (1, 1)
    layers = list(proj.nonlinear)
    assert [type(m) for m in layers] == [torch.nn.Conv2d, torch.nn.SiLU, torch.nn.Conv2d]
    assert layers[0].in_channels == 6 and layers[0].out_channels == 6 and layers[2].out_channels == 5

    lin = Projector(6, dim=5, projection_type="linear")
    assert lin.nonlinear is None
    assert not any("nonlinear" in k for k in lin.state_dict())


def test_projector_code_is_sum_of_branches_without_dropout():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 2, 3)
    proj = Projector(4, dim=3, dropout=False).train()
    signal, code = proj(feats)
    assert torch.equal(signal, feats)
    expected = proj.linear(feats) + proj.nonlinear(feats)
    torch.testing.assert_close(code, expected)
    signal2, code2 = proj(feats)
    assert torch.equal(code, code2) and torch.equal(signal2, feats)

    lin = Projector(4, dim=3, projection_type="linear", dropout=False)
    torch.testing.assert_close(lin(feats)[1], lin.linear(feats))


def test_projector_dropout_draws_three_independent_masks():
    torch.manual_seed(0)
    feats = torch.ones(4, 32, 2, 2)
    proj = Projector(32, dim=8, dropout=True, dropout_p=0.5)
    # Replace branches by identity-like probes that record their input.
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x[:, :8]

    proj.linear = Probe()
    proj.nonlinear = Probe()
    proj.train()
    signal, _ = proj(feats)
    assert len(seen) == 2
    masks = [(t[..., 0, 0] != 0) for t in (seen[0], seen[1], signal)]
    assert not torch.equal(signal, feats)
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[1], masks[2])
    # Dropout2d zeroes whole channels and rescales the rest by 1/(1-p).
    for t in (seen[0], seen[1], signal):
        assert set(t.unique().tolist()) <= {0.0, 2.0}
        assert torch.equal(t.amin(dim=(2, 3)), t.amax(dim=(2, 3)))

    proj.eval()
    seen.clear()
    signal, _ = proj(feats)
    assert torch.equal(signal, feats) and all(torch.equal(t, feats) for t in seen)


def test_projector_unknown_type():
    with pytest.raises(SmoosegError, match="projection_type"):
        Projector(4, projection_type="mlp")


def test_prototypes_init_normalised_and_teacher_copy():
    torch.manual_seed(0)
    pred = PrototypePredictor(dim=16, n_clusters=5)
    assert pred.student.shape == (5, 16)
    torch.testing.assert_close(pred.student.detach().norm(dim=1), torch.ones(5))
    assert torch.equal(pred.teacher, pred.student.detach())
    assert pred.teacher.data_ptr() != pred.student.data_ptr()
    assert "teacher" in pred.state_dict() and "student" in pred.state_dict()
    assert [n for n, _ in pred.named_parameters()] == ["student"]


def test_logits_are_cosines_by_hand():
    pred = PrototypePredictor(dim=2, n_clusters=2)
    with torch.no_grad():
        pred.student.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # un-normalised on purpose
        pred.teacher.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    code = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # B=1, D=2, h=1, w=2: pixels (1,1), (0,2)
    s, t = pred(code)
    assert s.shape == t.shape == (1, 2, 1, 2)
    r = 1 / math.sqrt(2)
    expected_s = [[r, 0.0], [r, 1.0]]  # [cluster][pixel]
    expected_t = [[(3 + 4) / 5 * r, 4 / 5], [r, 0.0]]
    torch.testing.assert_close(s[0, :, 0, :], torch.tensor(expected_s))
    torch.testing.assert_close(t[0, :, 0, :], torch.tensor(expected_t))
    torch.testing.assert_close(pred.teacher_logits(code), t)


def test_logits_float32_under_autocast():
    pred = PrototypePredictor(dim=4, n_clusters=3)
    code = torch.randn(2, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = pred(code.bfloat16())
        t2 = pred.teacher_logits(code.bfloat16())
    assert s.dtype == t.dtype == t2.dtype == torch.float32


def test_gradient_routing():
    torch.manual_seed(0)
    proj = Projector(6, dim=4, dropout=False)
    pred = PrototypePredictor(dim=4, n_clusters=3)
    feats = torch.randn(2, 6, 3, 3)

    _, code = proj(feats)
    _, t = pred(code)
    t.square().sum().backward()
    assert pred.student.grad is None
    assert proj.linear.weight.grad.abs().sum() > 0

    proj.zero_grad(set_to_none=True)
    _, code = proj(feats)
    s, _ = pred(code)
    s.square().sum().backward()
    assert pred.student.grad.abs().sum() > 0
    assert all(p.grad is None for p in proj.parameters())


def test_total_loss_backward_reaches_projector_and_student_not_teacher():
    torch.manual_seed(0)
    proj = Projector(6, dim=4)
    pred = PrototypePredictor(dim=4, n_clusters=3)
    feats = torch.randn(3, 6, 3, 3)
    signal, code = proj(feats)
    s, t = pred(code)
    loss = total_loss(signal, s, t, LossConfig(pos_intra_shift=-0.02, neg_inter_shift=0.48))["total"]
    loss.backward()
    assert pred.teacher.grad is None and not pred.teacher.requires_grad
    assert pred.student.grad.abs().sum() > 0
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ema_update_hand_recurrence_with_unnormalised_student():
    torch.manual_seed(0)
    pred = PrototypePredictor(dim=3, n_clusters=2)
    with torch.no_grad():
        pred.student.mul_(3.0)
    teacher0 = pred.teacher.clone()
    student = pred.student.detach().tolist()
    teacher = pred.teacher.tolist()
    alpha = 0.9
    for _ in range(3):
        pred.ema_update(alpha)
        teacher = [[alpha * t + (1 - alpha) * s for t, s in zip(tr, sr, strict=True)]
                   for tr, sr in zip(teacher, student, strict=True)]
    torch.testing.assert_close(pred.teacher, torch.tensor(teacher))
    # Student = 3·teacher0 enters un-normalised: rows grow to 0.9**3 + 3·(1 − 0.9**3) = 1.542;
    # a normalised student would have left the teacher at teacher0.
    torch.testing.assert_close(pred.teacher.norm(dim=1), torch.full((2,), 1.542))
    torch.testing.assert_close(F.normalize(pred.teacher, dim=1), teacher0)
    assert torch.equal(pred.state_dict()["teacher"], pred.teacher)

    loaded = PrototypePredictor(dim=3, n_clusters=2)
    loaded.load_state_dict(pred.state_dict())
    assert torch.equal(loaded.teacher, pred.teacher)


def test_ema_bad_alpha():
    with pytest.raises(SmoosegError, match="alpha"):
        PrototypePredictor(2, 2).ema_update(1.5)
