"""What the libraries print that asks nothing of the user, kept off the console: deprecations
inside the libraries, advertisements, notices about hardware this project never uses, and notes
on choices this project makes on purpose. The one place they are listed."""

import logging
import re
import warnings

KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch 2.9 (_pytree)
    r"Found \d+ module\(s\) in eval mode",  # the frozen ViT is in eval mode on purpose (docs/method.md §1)
    # steps are counted across epochs (max_epochs=-1): logging does happen every log_every_n_steps
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # a resumed run writes into its own checkpoints/ (a new run into a used folder is refused first)
    r"Checkpoint directory .* exists and is not empty",
)
# Lines of Lightning's log messages (a message of several lines keeps its other lines).
KNOWN_LOG_LINES = (
    re.compile(r"💡 Tip:"),  # Lightning's litlogger / litmodels advertisements
    re.compile(r"^(TPU|HPU|IPU) available: "),  # accelerators this project does not run on
    re.compile(r"^\s*0\s+Total Flops$"),  # the model summary's FLOPs are never measured here
    re.compile(r"Detected KeyboardInterrupt, attempting graceful shutdown"),  # the entry point says it
    re.compile(r"^`Trainer.fit` stopped: `max_steps=\d+` reached"),  # the progress shows the last step
)
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                     "lightning_fabric.utilities.rank_zero", "pytorch_lightning.callbacks.model_summary")


def drop_known_lines(message):
    """``message`` without its lines in ``KNOWN_LOG_LINES`` (None when nothing else is left)."""
    lines = str(message).split("\n")
    kept = [line for line in lines if not any(pattern.search(line) for pattern in KNOWN_LOG_LINES)]
    if len(kept) == len(lines):
        return message
    return "\n".join(kept) if any(line.strip() for line in kept) else None


class _DropKnownLines(logging.Filter):
    def filter(self, record):
        if record.args:
            return True  # formatted later: none of the known lines is logged with arguments
        message = drop_known_lines(record.msg)
        if message is None:
            return False
        record.msg = message
        return True


def quiet_known_noise():
    """Silence, in this process, the library messages in ``KNOWN_WARNINGS`` / ``KNOWN_LOG_LINES``;
    any other warning or line still shows."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
            logger.addFilter(_DropKnownLines())
