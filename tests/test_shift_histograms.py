"""Shift-tuning histograms: the pure functions against hand computations, and what training logs."""

import math

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from conftest import ROOT, make_module
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.model.losses import LossConfig, shift_histograms, smoothness_parts, total_loss
from smooseg.settings import train_settings
from smooseg.train.train import train

# ---- pure functions ---------------------------------------------------------------------------


def cos(u, v):
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def ref_parts(signal, teacher, pairing, tau, pointwise):
    """Plain-python F and Dq of both terms: lists [b][i][j]; signal / teacher are B×C×N tensors."""
    feats = [[signal[b, :, p].tolist() for p in range(signal.shape[2])] for b in range(signal.shape[0])]
    q = torch.softmax(teacher / tau, dim=1)
    assign = [[q[b, :, p].tolist() for p in range(q.shape[2])] for b in range(q.shape[0])]

    def corr(other):
        out = [[[cos(u, v) for v in feats[other[b]]] for u in feats[b]] for b in range(len(feats))]
        if pointwise:
            flat = [v for m in out for r in m for v in r]
            mean = sum(flat) / len(flat)
            out = [[[v - sum(r) / len(r) for v in r] for r in m] for m in out]
            flat = [v for m in out for r in m for v in r]
            mean2 = sum(flat) / len(flat)
            out = [[[v - mean2 + mean for v in r] for r in m] for m in out]
        return out

    def dist(other):
        return [[[1 - cos(u, v) for v in assign[other[b]]] for u in assign[b]] for b in range(len(assign))]

    same = list(range(len(feats)))
    return {"intra_similarity": corr(same), "intra_distance": dist(same),
            "inter_similarity": corr(pairing), "inter_distance": dist(pairing)}


@pytest.mark.parametrize("pointwise", [True, False])
def test_parts_match_hand_computation_and_reproduce_the_loss(pointwise):
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(3, 4, 2, 2, generator=g)  # B=3, C=4, N=4
    teacher = torch.randn(3, 5, 2, 2, generator=g) * 0.3  # K=5
    pairing = torch.tensor([2, 0, 1])
    parts = smoothness_parts(signal, teacher, temperature=0.1, pointwise=pointwise, pairing=pairing)
    expected = ref_parts(signal.flatten(2), teacher.flatten(2), pairing.tolist(), 0.1, pointwise)
    for key, value in expected.items():
        assert parts[key].shape == (3, 4, 4) and not parts[key].requires_grad
        torch.testing.assert_close(parts[key], torch.tensor(value), atol=1e-5, rtol=1e-5)
    # the loss is exactly mean((F − shift)·Dq) of these tensors, for the same pairing
    config = LossConfig(temperature=0.1, pos_intra_shift=-0.02, neg_inter_shift=0.5, pointwise=pointwise)
    loss = total_loss(signal, teacher, teacher, config, pairing=pairing)
    intra = ((parts["intra_similarity"] + 0.02) * parts["intra_distance"]).mean()
    inter = ((parts["inter_similarity"] - 0.5) * parts["inter_distance"]).mean()
    torch.testing.assert_close(loss["intra"], intra)
    torch.testing.assert_close(loss["inter"], inter)


def test_parts_of_a_graph_carry_no_gradient():
    signal = torch.randn(2, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 4, 2, 2, requires_grad=True)
    parts = smoothness_parts(signal, teacher)
    assert all(not v.requires_grad for v in parts.values())


def hand_parts():
    # B=1, N=2 (4 pairs): similarities and distances chosen so that distance = 1 − similarity / 2
    intra = torch.tensor([[[0.9, -0.1], [0.3, 0.0]]])
    inter = torch.tensor([[[0.6, 0.2], [0.5, 0.7]]])
    return {"intra_similarity": intra, "intra_distance": 1 - intra / 2,
            "inter_similarity": inter, "inter_distance": 1 - inter / 2}


def test_shift_histograms_by_hand():
    values, fractions = shift_histograms(hand_parts(), pos_intra_shift=-0.02, neg_inter_shift=0.5)
    # intra: 0.9, 0.3, 0.0 > −0.02 (−0.1 is not) -> 3/4 ; inter: 0.6, 0.7 > 0.5 (0.5 is not) -> 2/4
    assert fractions["intra"].item() == pytest.approx(0.75)
    assert fractions["inter"].item() == pytest.approx(0.5)
    torch.testing.assert_close(values["intra_similarity"], torch.tensor([0.9, -0.1, 0.3, 0.0]))
    torch.testing.assert_close(values["intra_weight"], torch.tensor([0.92, -0.08, 0.32, 0.02]))
    torch.testing.assert_close(values["inter_weight"], torch.tensor([0.1, -0.3, 0.0, 0.2]))
    torch.testing.assert_close(values["inter_distance"], torch.tensor([0.7, 0.9, 0.75, 0.65]))
    assert sorted(values) == ["inter_distance", "inter_similarity", "inter_weight",
                              "intra_distance", "intra_similarity", "intra_weight"]


def test_shift_histograms_subsample_keeps_pairs_and_global_rng():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 30, 30, generator=g) * 2 - 1  # 3600 pairs per term
    parts = {"intra_similarity": sim, "intra_distance": 1 - sim / 2,
             "inter_similarity": -sim, "inter_distance": 1 + sim / 2}
    state = torch.get_rng_state()
    values, fractions = shift_histograms(parts, 0.1, 0.4, max_values=500,
                                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: training RNG untouched
    again, _ = shift_histograms(parts, 0.1, 0.4, max_values=500, generator=torch.Generator().manual_seed(7))
    for key, v in values.items():
        assert v.shape == (500,)
        assert torch.equal(v, again[key])  # seeded -> reproducible
    # every sampled value is one of the pairs, and the three tensors of a term stay aligned
    assert torch.isin(values["intra_similarity"], sim.reshape(-1)).all()
    torch.testing.assert_close(values["intra_distance"], 1 - values["intra_similarity"] / 2)
    torch.testing.assert_close(values["inter_distance"], 1 - values["inter_similarity"] / 2)
    torch.testing.assert_close(values["inter_weight"], values["inter_similarity"] - 0.4)
    # the fractions use all pairs, not the sample
    assert fractions["intra"].item() == pytest.approx((sim > 0.1).float().mean().item())
    assert fractions["inter"].item() == pytest.approx((-sim > 0.4).float().mean().item())


# ---- what training logs -----------------------------------------------------------------------

HIST_TAGS = sorted(f"hist/{term}_{kind}" for term in ("intra", "inter")
                   for kind in ("similarity", "weight", "distance"))
FRACTION_TAGS = ["shift/inter_attract_fraction", "shift/intra_attract_fraction"]
BATCH, SIZE = 4, 64  # ViT-S/16 at 64 px: N = 16 patches, B·N·N = 1024 pairs per term


def fit(tmp_path, hist_freq, steps, logger=True):
    pl.seed_everything(0)
    module = make_module(n_classes=3, model_type="vit_small", patch_size=16, dim=16,
                         pos_intra_shift=0.1, neg_inter_shift=0.4, hist_freq=hist_freq)
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    data = [{"img": torch.randn(3, SIZE, SIZE, generator=g), "label": label} for _ in range(8)]
    tb = TensorBoardLogger(tmp_path, name="tb", version="") if logger else False
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=tb, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=True))
    return module


def events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_histograms_are_logged_every_hist_freq_steps(tmp_path):
    fit(tmp_path, hist_freq=2, steps=3)
    acc = events(tmp_path / "tb")
    assert sorted(acc.Tags()["histograms"]) == HIST_TAGS
    for tag in HIST_TAGS:
        logged = acc.Histograms(tag)
        assert [e.step for e in logged] == [0, 2]
        assert all(e.histogram_value.num == BATCH * 16 * 16 for e in logged)  # all pairs (< 100k)
    for tag in FRACTION_TAGS:
        values = acc.Scalars(tag)
        assert [e.step for e in values] == [0, 2] and all(0.0 <= e.value <= 1.0 for e in values)
    for step in range(2):
        for term, shift in (("intra", 0.1), ("inter", 0.4)):
            sim = acc.Histograms(f"hist/{term}_similarity")[step].histogram_value
            weight = acc.Histograms(f"hist/{term}_weight")[step].histogram_value
            dist = acc.Histograms(f"hist/{term}_distance")[step].histogram_value
            # weight = similarity − shift on the same pairs; distances lie in [0, 1]
            assert weight.sum == pytest.approx(sim.sum - shift * sim.num, abs=1e-2)
            assert weight.min == pytest.approx(sim.min - shift, abs=1e-5)
            assert -1e-5 <= dist.min and dist.max <= 1 + 1e-5
    # pixel i with itself: 1 − rowmean_i + global mean >= 1 for the row with the lowest mean
    assert acc.Histograms("hist/intra_similarity")[0].histogram_value.max >= 1 - 1e-4


def test_histogram_logging_leaves_training_unchanged_and_off_logs_nothing(tmp_path):
    logged = fit(tmp_path / "on", hist_freq=1, steps=2)
    assert [e.step for e in events(tmp_path / "on" / "tb").Histograms("hist/inter_weight")] == [0, 1]
    plain = fit(tmp_path / "off", hist_freq=0, steps=2)
    acc = events(tmp_path / "off" / "tb")
    assert acc.Tags()["histograms"] == []
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("shift/")]
    assert "train/loss" in acc.Tags()["scalars"]
    for key, value in plain.state_dict().items():
        assert torch.equal(value, logged.state_dict()[key]), key
    fit(tmp_path / "nologger", hist_freq=1, steps=1, logger=False)  # no TensorBoard: silently nothing


def test_hist_freq_from_the_config():
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hist_freq=50"])
        assert (train_settings(cfg).hist_freq, train_settings(cfg).linear_probe) == (50, False)
        bad = compose(config_name="train", overrides=["hist_freq=-1"])
    with pytest.raises(SmoosegError, match="hist_freq=-1 is not allowed: hist_freq must be an integer >= 0"):
        train_settings(bad)


def test_training_entry_logs_histograms(tmp_path):
    data_dir = write_cityscapes_layout(tmp_path / "data", n_train=4, n_val=2, size=(32, 64), seed=0)
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=demo", "model=dino_vits16", "model.pretrained=false", f"data_dir={data_dir}",
            f"output_dir={tmp_path / 'out'}", "res=32", "eval_res=32", "batch_size=2", "max_steps=3",
            "val_check_interval=3", "hist_freq=2", "trainer.enable_progress_bar=false"])
    train(train_settings(cfg))
    acc = events(tmp_path / "out" / "tensorboard")
    assert sorted(acc.Tags()["histograms"]) == HIST_TAGS
    assert [e.step for e in acc.Histograms("hist/intra_distance")] == [0, 2]
    assert [e.histogram_value.num for e in acc.Histograms("hist/intra_distance")] == [2 * 4 * 4] * 2
