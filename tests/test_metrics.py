import math

import numpy as np
import pytest
import torch

from smooseg.errors import SmoosegError
from smooseg.eval.metrics import ClusterMetrics, cluster_to_class_map, hungarian_match, scores

# Rows = clusters, columns = classes. Best matching: class0<-cluster1, class1<-cluster2, class2<-cluster0.
CONF = np.array([
    [1, 2, 7],
    [8, 1, 0],
    [1, 6, 2],
])


def test_hungarian_and_scores_by_hand():
    assignment = hungarian_match(CONF)
    assert assignment.tolist() == [1, 2, 0]
    out = scores(CONF, assignment)
    # class0: tp 8, fp (8+1+0)-8=1, fn (1+8+1)-8=2 -> 8/11
    # class1: tp 6, fp (1+6+2)-6=3, fn (2+1+6)-6=3 -> 6/12
    # class2: tp 7, fp (1+2+7)-7=3, fn (7+0+2)-7=2 -> 7/12
    iou = [8 / 11, 6 / 12, 7 / 12]
    np.testing.assert_allclose(out["iou"].numpy(), np.array(iou) * 100)
    assert out["mIoU"] == pytest.approx(sum(iou) / 3 * 100)
    assert out["Accuracy"] == pytest.approx(21 / 28 * 100)


def test_column_permutation_gives_same_scores_and_inverse_assignment():
    perm = [2, 0, 1]  # new class j is old class perm[j]
    permuted = CONF[:, perm]
    a = hungarian_match(CONF)
    b = hungarian_match(permuted)
    assert b.tolist() == [a[p] for p in perm]
    s1, s2 = scores(CONF, a), scores(permuted, b)
    assert s1["mIoU"] == pytest.approx(s2["mIoU"])
    assert s1["Accuracy"] == pytest.approx(s2["Accuracy"])
    np.testing.assert_allclose(s2["iou"].numpy(), s1["iou"].numpy()[perm])
    # Row permutation of the clusters: assignment follows the inverse map.
    rows = [2, 0, 1]  # new cluster r is old cluster rows[r]
    c = hungarian_match(CONF[rows])
    inverse = {old: new for new, old in enumerate(rows)}
    assert c.tolist() == [inverse[k] for k in a]


def test_rectangular_match_and_too_few_clusters():
    conf = np.array([[0, 1], [5, 0], [0, 0], [1, 4]])
    assert hungarian_match(conf).tolist() == [1, 3]
    with pytest.raises(SmoosegError, match="clusters"):
        hungarian_match(conf.T)


def test_undefined_iou_is_nan_and_excluded_from_mean():
    conf = np.array([[5, 0, 0], [1, 3, 0], [0, 0, 0]])  # class 2 never occurs and cluster 2 is empty
    assignment = hungarian_match(conf)
    assert assignment.tolist() == [0, 1, 2]
    out = scores(conf, assignment)
    assert math.isnan(out["iou"][2].item())
    # class0: 5/(5+0+1) ; class1: 3/(3+1+0)
    assert out["mIoU"] == pytest.approx((5 / 6 + 3 / 4) / 2 * 100)
    assert out["Accuracy"] == pytest.approx(8 / 9 * 100)


def test_cluster_to_class_map():
    mapping = cluster_to_class_map(np.array([3, 0, 1]), n_clusters=5)
    assert mapping.dtype == torch.long
    assert mapping.tolist() == [1, 2, -1, 0, -1]


def test_metric_confusion_and_ignore_label():
    m = ClusterMetrics(n_classes=2, n_clusters=2)
    preds = torch.tensor([[0, 0, 1], [1, 1, 0]])
    target = torch.tensor([[0, -1, 1], [1, 255, 1]])
    m.update(preds, target)
    assert m.confusion.dtype == torch.long
    assert m.confusion.tolist() == [[1, 1], [0, 2]]
    out = m.compute()
    # assignment class0<-0, class1<-1. class0: tp1 fp1 fn0 -> 1/2 ; class1: tp2 fp0 fn1 -> 2/3
    assert out["assignment"].tolist() == [0, 1]
    assert out["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    assert out["Accuracy"] == pytest.approx(3 / 4 * 100)
    assert torch.equal(out["confusion"], m.confusion.cpu())
    assert isinstance(out["mIoU"], float) and isinstance(out["Accuracy"], float)


PREDS = torch.tensor([0, 0, 1, 2, 2, 1, 0, 2])
TARGET = torch.tensor([0, 0, 1, 1, 0, 1, 1, -1])


def test_extra_clusters_counted_as_errors():
    m = ClusterMetrics(n_classes=2, n_clusters=3)
    m.update(PREDS, TARGET)
    assert m.confusion.tolist() == [[2, 1], [0, 2], [1, 1]]
    out = m.compute()
    assert out["assignment"].tolist() == [0, 1]
    # class0: tp2 fp1 fn1 -> 2/4 ; class1: tp2 fp0 fn2 -> 2/4 ; acc 4/7
    assert out["iou"].tolist() == pytest.approx([50.0, 50.0])
    assert out["mIoU"] == pytest.approx(50.0)
    assert out["Accuracy"] == pytest.approx(4 / 7 * 100)


def test_extra_clusters_dropped_with_reference_quirk():
    m = ClusterMetrics(n_classes=2, n_clusters=3, mask_extra_clusters=True)
    m.update(PREDS, TARGET)
    assert m.confusion.tolist() == [[2, 1], [0, 2], [0, 0]]
    out = m.compute()
    # class0: tp2 fp1 fn0 -> 2/3 ; class1: tp2 fp0 fn1 -> 2/3 ; acc 4/5
    assert out["mIoU"] == pytest.approx(2 / 3 * 100)
    assert out["Accuracy"] == pytest.approx(4 / 5 * 100)


def test_accumulation_over_updates_equals_one_update():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (4, 6, 7), generator=gen)
    target = torch.randint(-1, 4, (4, 6, 7), generator=gen)
    one = ClusterMetrics(n_classes=4, n_clusters=5)
    one.update(preds, target)
    two = ClusterMetrics(n_classes=4, n_clusters=5)
    two.update(preds[:1], target[:1])
    two.update(preds[1:], target[1:])
    assert torch.equal(one.confusion, two.confusion)
    a, b = one.compute(), two.compute()
    assert a["mIoU"] == b["mIoU"] and a["Accuracy"] == b["Accuracy"]
    assert int(one.confusion.sum()) == int((target >= 0).sum())
    two.reset()
    assert int(two.confusion.sum()) == 0


def test_metric_input_errors():
    m = ClusterMetrics(n_classes=2, n_clusters=3)
    with pytest.raises(SmoosegError, match=r"\[0, 3\)"):
        m.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(SmoosegError, match=r"\[0, 3\)"):
        m.update(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(SmoosegError, match="shape"):
        m.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(SmoosegError, match="n_clusters"):
        ClusterMetrics(n_classes=3, n_clusters=2)


def test_states_merge_by_summing_counts():
    # The same reduction (sum) is used to combine processes before matching.
    gen = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 4, (2, 5, 5), generator=gen)
    target = torch.randint(-1, 3, (2, 5, 5), generator=gen)
    whole = ClusterMetrics(n_classes=3, n_clusters=4)
    whole.update(preds, target)
    a, b = ClusterMetrics(n_classes=3, n_clusters=4), ClusterMetrics(n_classes=3, n_clusters=4)
    a.update(preds[0], target[0])
    b.update(preds[1], target[1])
    a.merge_state(b)
    assert torch.equal(a.confusion, whole.confusion)
    assert a.compute()["mIoU"] == whole.compute()["mIoU"]
