"""Lightning callbacks of a training run: the best and last checkpoints (each written whole or
not at all), the random streams saved in them, a validation at ``max_steps`` and a checkpoint
when the run is preempted."""

import io
import random
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from smooseg.io import atomic_write
from smooseg.train.progress import StepProgress

# No "=" in the name: Hydra list overrides (model_paths=[...]) could not take it unquoted.
BEST_FILENAME = "best-step{step}-mIoU{val/cluster/mIoU:.2f}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written through :func:`smooseg.io.atomic_write`: a temporary file in the
    checkpoint's own folder, flushed and renamed.

    Lightning's own writer stages the file under ``$TMPDIR`` and moves it; with the run folder on
    another file system (local ``/tmp``, runs on NFS / Lustre) that move is a truncate and copy,
    and a kill inside it leaves a torn ``last.ckpt``. Here a kill, a full disk or a failed write
    leaves the previous file whole and no partial file.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()  # serialised first, as Lightning does: a full disk is then an OSError
        torch.save(checkpoint, buffer)  # (torch's own file writer reports it as a RuntimeError)
        with atomic_write(path) as tmp:
            Path(tmp).write_bytes(buffer.getbuffer())


class AtomicCheckpoints(Callback):
    """Installs :class:`AtomicCheckpointIO` as the trainer's checkpoint writer before anything is
    saved (every checkpoint of the fit: best, last, the one written on SIGTERM)."""

    def setup(self, trainer, pl_module, stage):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class ValidateAtMaxSteps(Callback):
    """Ask the loop to stop at ``max_steps``, so the final state is validated and checkpointed too."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, rewritten at every validation.

    (Lightning 2.6's ``save_last`` rewrites it only when a best-k checkpoint is saved at the same
    step, so a run whose mIoU stops improving would resume from an old state.)
    """

    def __init__(self, dirpath):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False)


def random_state():
    """The global random streams (torch CPU and CUDA, numpy, python) as tensors and plain values,
    so a checkpoint holding them still loads with weights-only unpickling."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_random_state(state):
    """Restore what :func:`random_state` returned (CUDA streams for the devices present)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class RandomStateCheckpoint(Callback):
    """Saves the global random streams in checkpoints and restores them when a fit resumes.

    Dropout masks and the inter-image pairing draw from the global torch stream; restoring it at
    ``on_train_start`` makes a resumed run draw what the uninterrupted run would have drawn.
    """

    def __init__(self):
        self._to_restore = None

    def state_dict(self):
        return random_state()

    def load_state_dict(self, state_dict):
        self._to_restore = state_dict

    def on_train_start(self, trainer, pl_module):
        if self._to_restore is not None:
            set_random_state(self._to_restore)
            self._to_restore = None


class SaveOnSigterm(Callback):
    """Preemption (SIGTERM, what SLURM and most schedulers send): ``last.ckpt`` at the step reached.

    Lightning's signal connector notes the SIGTERM (``trainer.received_sigterm``) and ends the fit
    with ``SIGTERMException`` once the current batch is done, on every process together; this
    callback then writes a full training checkpoint (``trainer.save_checkpoint``, so it resumes
    with ``ckpt_path=last`` like any other) onto ``last.ckpt``, atomically
    (:class:`AtomicCheckpointIO`), so a second signal never leaves half a file. ``saved`` /
    ``step`` say what was written (None when nothing was).

    A signal noted on an epoch's last batch is saved at once, in ``on_train_batch_end``: Lightning
    2.6 would stop between that batch and the epoch's end, and its loops, restored from there,
    start the next epoch with the old epoch's batch count (the resumed run then trains other
    batches); a checkpoint written at a batch's end is one its loops restore exactly.
    """

    def __init__(self, dirpath):
        self.dirpath = Path(dirpath)
        self.saved, self.step = None, None

    def save(self, trainer):
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # every process takes part; rank zero writes
        self.saved, self.step = path, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.received_sigterm and batch_idx + 1 >= trainer.num_training_batches:
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if (not isinstance(exception, SIGTERMException) or trainer.global_step == 0
                or self.step == trainer.global_step):
            return
        self.save(trainer)


class BestCheckpoint(ModelCheckpoint):
    """``best-step<step>-mIoU<score>.ckpt``: the checkpoint of the best validation mIoU so far. A
    validation that scored nothing (no labelled pixel: the module logs no mIoU) keeps nothing,
    where Lightning would save a ``best-…-mIoUnan`` file with the score -inf."""

    def __init__(self, dirpath):
        super().__init__(dirpath=dirpath, filename=BEST_FILENAME, monitor="val/cluster/mIoU", mode="max",
                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)

    @property
    def state_key(self):
        """The key of Lightning's own ModelCheckpoint, so checkpoints written before this class
        existed resume with their best score."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_topk_checkpoint(self, trainer, monitor_candidates):
        score = monitor_candidates.get(self.monitor)
        if score is None or not torch.isfinite(torch.as_tensor(score)).item():
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


def build_callbacks(output_dir, best=True, progress=True):
    """Best-by-validation-mIoU checkpoint (unless not ``best``: a validation set without labels
    has no mIoU to choose by) plus ``last.ckpt`` in ``<output_dir>/checkpoints``, and with
    ``progress`` (``trainer.enable_progress_bar``) the progress in steps (:class:`StepProgress`).

    Files are overwritten rather than versioned, so ``last.ckpt`` is always the latest state.
    The random streams go into every checkpoint too (:class:`RandomStateCheckpoint`), and every
    checkpoint is written atomically in its own folder (:class:`AtomicCheckpoints`).
    """
    folder = str(Path(output_dir) / "checkpoints")
    chosen = [BestCheckpoint(folder)] if best else []
    return [AtomicCheckpoints(), *chosen, LastCheckpoint(folder), RandomStateCheckpoint(),
            ValidateAtMaxSteps(), *([StepProgress()] if progress else [])]


def best_checkpoint_callback(trainer):
    """The callback that keeps the best checkpoint by validation mIoU, or None (no labels)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, BestCheckpoint):
            return callback
    return None


def last_good_checkpoint(trainer):
    """Path of the last checkpoint this fit wrote (or resumed from), or None."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint) and callback.best_model_path:
            if Path(callback.best_model_path).is_file():
                return callback.best_model_path
    return None
