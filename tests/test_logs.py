"""Logs fit for clusters: with stdout not a terminal, progress is plain lines counted in steps
(never ``\\r``), one log format, Lightning's irrelevant notices off, two decimals, and a summary of
one checkpoint shows no ``± -``."""

import io
import logging
import re

import pytest

from conftest import run_script
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.eval.results import format_runs, summarize_runs
from smooseg.logs import drop_known_lines, quiet_known_noise
from smooseg.train.progress import StepProgress, eta, metrics_line, progress_line

TINY = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "num_workers=0", "logger=none", "seed=0", "val_check_interval=2", "max_steps=4",
        "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_a_non_tty_run_logs_plain_lines_in_steps(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=6, n_val=2, size=(32, 64))
    proc = run_script("train_segmentation.py", *TINY, f"data_dir={data}", f"output_dir={tmp_path / 'out'}")
    text = proc.stdout + proc.stderr
    assert "\r" not in text and "\x1b[" not in text  # no bar updates, no cursor movement
    pattern = r"^step (\d+)/4  loss \d+\.\d\d  \d+\.\d\d images/s  ETA \d+:\d\d:\d\d$"
    steps = [int(n) for n in re.findall(pattern, proc.stdout, re.MULTILINE)]
    assert steps == [1, 2, 3, 4], proc.stdout
    assert re.search(r"^validation at step 2: val/cluster/Accuracy \d+\.\d\d  val/cluster/mIoU \d+\.\d\d$",
                     proc.stdout, re.MULTILINE)
    assert re.search(r"^best checkpoint: \S+ \(val mIoU \d+\.\d\d\)$", proc.stdout, re.MULTILINE)
    for noise in ("Epoch ", "TPU available", "Total Flops", "Trainer.fit` stopped", "][INFO]", "Tip:"):
        assert noise not in text, noise
    logs = list((tmp_path / "out").glob("*.log"))  # the run's log, opened once every check has passed
    assert [log.name for log in logs] == ["train_segmentation.log"]
    logged = logs[0].read_text()
    assert "\r" not in logged and "][INFO]" not in logged


def test_progress_line_and_eta():
    assert (progress_line(40, 3000, 2.7812, 12.345, 252.4)
            == "step 40/3000  loss 2.78  12.35 images/s  ETA 0:04:12")
    assert progress_line(1, 10, None, None, None) == "step 1/10"
    assert eta(3 * 3600 + 61.6) == "3:01:02"
    assert metrics_line(8, {"val/b": 1.0, "val/a": 20.456}) == "validation at step 8: val/a 20.46  val/b 1.00"


class FakeTrainer:
    def __init__(self, step, max_steps=100, every=10):
        self.global_step, self.max_steps, self.log_every_n_steps = step, max_steps, every
        self.world_size, self.callback_metrics = 1, {}


def test_plain_progress_every_n_steps_or_seconds(monkeypatch):
    import torch

    clock = [0.0]
    monkeypatch.setattr("smooseg.train.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = StepProgress(stream=out, interactive=False, interval_s=30)
    bar.on_train_start(FakeTrainer(0), None)
    batch = {"img": torch.zeros(4, 3, 2, 2)}
    for step in range(1, 25):
        clock[0] += 1.0 if step < 15 else 40.0  # slow steps from step 15 on
        bar.on_train_batch_end(FakeTrainer(step), None, {"loss": torch.tensor(1.0)}, batch, step)
    lines = out.getvalue().splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [10] + list(range(15, 25))
    assert lines[0] == "step 10/100  loss 1.00  4.00 images/s  ETA 0:01:30"


def test_known_lines_are_dropped_from_lightning_messages():
    summary = "\n  | Name | Type\n21.9 M    Total params\n0         Total Flops"
    assert drop_known_lines(summary) == "\n  | Name | Type\n21.9 M    Total params"
    assert drop_known_lines("TPU available: False, using: 0 TPU cores") is None
    kept = "GPU available: True (cuda), used: True"
    assert drop_known_lines(kept) == kept
    quiet_known_noise()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("TPU available: False, using: 0 TPU cores")
        logger.info("\nDetected KeyboardInterrupt, attempting graceful shutdown ...")
        logger.info("kept")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert stream.getvalue() == "kept\n"


def test_a_summary_of_one_checkpoint_shows_no_empty_spread():
    one = format_runs(summarize_runs([{"checkpoint": "a.ckpt", "mIoU": 19.81654, "Accuracy": 60.0}]),
                      "checkpoint")
    assert "± -" not in one and "19.82" in one and "19.81654" not in one
    two = format_runs(summarize_runs([{"checkpoint": "a", "mIoU": 10.0, "Accuracy": 50.0},
                                      {"checkpoint": "b", "mIoU": 12.0, "Accuracy": 54.0}]), "checkpoint")
    assert "11.00 ± 1.41" in two


def test_on_a_terminal_one_bar_counts_the_steps():
    import torch

    out = io.StringIO()
    bar = StepProgress(stream=out, interactive=True)
    bar.on_train_start(FakeTrainer(10, max_steps=50), None)  # a resumed run starts at its step
    assert bar._bar.total == 50 and bar._bar.n == 10
    for step in range(11, 16):
        bar.on_train_batch_end(FakeTrainer(step, max_steps=50), None, {"loss": torch.tensor(0.5)},
                               {"img": torch.zeros(2)}, step)
    assert bar._bar.n == 15
    bar.on_train_end(None, None)
    assert "15/50" in out.getvalue() and "Epoch" not in out.getvalue()
