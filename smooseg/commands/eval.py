"""Evaluate checkpoints: flip averaging, optional dense CRF and Hungarian-matched metrics on the
checkpoint's data set (or dataset=...).

Prints a per-class IoU table and writes <output_dir>/<checkpoint>/metrics.json plus coloured PNGs
of the first n_images images, then the summary over the checkpoints (mean ± sample std, min, max
of mIoU and Accuracy) in <output_dir>/summary.json. model_paths entries may be glob patterns:
model_paths='runs/*/checkpoints/best-*.ckpt'. Config: smooseg/configs/eval.yaml.
"""

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-eval model_paths=[run/checkpoints/last.ckpt] data_dir=/data",
    "smooseg-eval 'model_paths=runs/*/checkpoints/best-*.ckpt' data_dir=/data crf=false",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.eval.evaluate import run_eval  # heavy imports only once a run starts (not for --cfg/--help)

    run_eval(cfg)


def main():
    """The ``smooseg-eval`` program."""
    launch(task, "eval", __doc__, EXAMPLES)
