"""Training progress counted in optimiser steps (the schedule is step-based: ``max_steps``).

On a terminal: one bar over the steps. Anywhere else (a file, a pipe, a cluster's job log):
plain lines, one every ``log_every_n_steps`` steps or ``interval_s`` seconds, whichever comes
first, never ``\\r`` updates: ``step 40/3000  loss 2.78  12.34 images/s  ETA 0:04:12``, and one
line per validation with its metrics. Numbers have two decimals.
"""

import datetime
import sys
import time

import torch
from pytorch_lightning.callbacks import ProgressBar

INTERVAL_S = 60.0  # the longest a plain-line log stays silent while training runs


def batch_items(batch):
    """How many images a training batch holds (its first tensor's length; 0 when it has none)."""
    if isinstance(batch, dict):
        values = batch.values()
    else:
        values = batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def eta(seconds):
    """``H:MM:SS`` (whole seconds)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def progress_line(step, max_steps, loss, rate, seconds_left):
    """One progress line; ``loss`` / ``rate`` / ``seconds_left`` None when not known yet."""
    parts = [f"step {step}/{max_steps}"]
    if loss is not None:
        parts.append(f"loss {loss:.2f}")
    if rate is not None:
        parts.append(f"{rate:.2f} images/s")
    if seconds_left is not None:
        parts.append(f"ETA {eta(seconds_left)}")
    return "  ".join(parts)


def metrics_line(step, metrics):
    """One line of validation metrics at ``step`` (two decimals, names as logged)."""
    shown = "  ".join(f"{name} {value:.2f}" for name, value in sorted(metrics.items()))
    return f"validation at step {step}: {shown}"


class StepProgress(ProgressBar):
    """Lightning's progress bar replaced: a bar over the steps on a terminal, else plain lines
    (see the module). ``stream`` is where it writes (stdout); ``interactive`` forces either form."""

    def __init__(self, stream=None, interactive=None, interval_s=INTERVAL_S):
        super().__init__()
        self.stream = stream
        self.interactive = interactive
        self.interval_s = float(interval_s)
        self._enabled = True
        self._bar = None
        self._start = self._last_line = None
        self._start_step = self._last_step = 0
        self._images = 0

    # Lightning's ProgressBar interface
    def disable(self):
        self._enabled = False

    def enable(self):
        self._enabled = True

    @property
    def out(self):
        return self.stream if self.stream is not None else sys.stdout

    def is_interactive(self):
        if self.interactive is not None:
            return self.interactive
        return bool(getattr(self.out, "isatty", lambda: False)())

    def write(self, line):
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def on_train_start(self, trainer, pl_module):
        if not self._enabled:
            return
        self._start = self._last_line = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._images = 0
        if self.is_interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="step",
                             file=self.out, dynamic_ncols=True, unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._enabled or self._start is None:
            return
        self._images += batch_items(batch) * trainer.world_size
        step, now = trainer.global_step, time.monotonic()
        loss = self.loss(trainer, outputs)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if loss is not None:
                self._bar.set_postfix_str(f"loss {loss:.2f}", refresh=False)
            return
        due = (step - self._last_step >= max(int(trainer.log_every_n_steps), 1)
               or now - self._last_line >= self.interval_s or step >= trainer.max_steps)
        if step > self._last_step and due:
            self.write(self.line(trainer, step, now, loss))
            self._last_step, self._last_line = step, now

    def line(self, trainer, step, now, loss):
        elapsed = now - self._start
        done = step - self._start_step
        rate = self._images / elapsed if elapsed > 0 and self._images else None
        left = elapsed / done * (trainer.max_steps - step) if done > 0 and trainer.max_steps > 0 else None
        return progress_line(step, trainer.max_steps, loss, rate, left)

    @staticmethod
    def loss(trainer, outputs):
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if value is None:
            value = trainer.callback_metrics.get("train/loss")
        return None if value is None else float(value)

    def on_validation_end(self, trainer, pl_module):
        if not self._enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith("val/") and torch.as_tensor(value).numel() == 1
                   and torch.isfinite(torch.as_tensor(value)).item()}  # no mIoU without labels: not shown
        if metrics:
            self.write(metrics_line(trainer.global_step, metrics))

    def on_train_end(self, trainer, pl_module):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
