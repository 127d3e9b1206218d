"""The recipes of docs/extending.md, done inside the test with no other file changed (the backbone
and data set recipes are in test_backbone_registry.py and test_dataset_recipe.py)."""

import csv

import pytest

from conftest import TRAIN_OVERRIDES, train_settings
from smooseg.errors import SmoosegError
from smooseg.model.losses import LOSS_TERMS, loss_term


def assignment_entropy(x):
    """Mean entropy of the teacher's soft assignments (the example of docs/extending.md)."""
    q = x.assignment.clamp_min(1e-8)
    return -(q * q.log()).sum(dim=1).mean()


@pytest.fixture
def entropy_term():
    loss_term("entropy")(assignment_entropy)
    try:
        yield
    finally:
        del LOSS_TERMS["entropy"]


@pytest.mark.slow
def test_add_a_loss_term(entropy_term, synthetic_data, tmp_path):
    from smooseg.train.train import train

    overrides = [o for o in TRAIN_OVERRIDES if not o.startswith(("max_steps", "val_check_interval"))]
    settings = train_settings(overrides + [
        "+loss.weights.entropy=0.1", "max_steps=2", "val_check_interval=2", "logger=csv",
        "trainer.log_every_n_steps=1", f"data_dir={synthetic_data}", f"output_dir={tmp_path}"])
    assert settings.loss.weights == {"intra": 1.0, "inter": 1.0, "data": 1.0, "entropy": 0.1}
    result = train(settings)
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("train/entropy")]
    assert logged, "the new term is logged as train/entropy"
    row = logged[0]
    parts = sum(float(row[f"train/{name}"]) for name in ("intra", "inter", "data", "entropy"))
    assert float(row["train/loss"]) == pytest.approx(parts, abs=1e-5)
    assert 0 < float(row["train/entropy"]) <= 0.1 * 3.3  # 0.1 x entropy, at most ln(27 clusters)
    assert result["final_eval"] is not None and 0 <= result["final_eval"]["mIoU"] <= 100


def test_an_unregistered_term_stops_before_anything_is_written(tmp_path):
    with pytest.raises(SmoosegError, match="loss.weights.entropy names no loss term"):
        train_settings(["+loss.weights.entropy=0.1", f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
