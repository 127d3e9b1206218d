"""Evaluate checkpoints: flip averaging, optional dense CRF and Hungarian-matched metrics on the
checkpoint's data set (or dataset=...).

Prints a per-class IoU table and writes <output_dir>/<checkpoint>/metrics.json plus coloured PNGs
of the first n_images images, then the summary over the checkpoints (mean ± sample std, min, max
of mIoU and Accuracy) in <output_dir>/summary.json. model_paths entries may be glob patterns:
model_paths='runs/*/checkpoints/best-*.ckpt'. Config: smooseg/configs/eval.yaml.

Compare two results: --compare a/metrics.json b/metrics.json prints their provenance side by side
and exits 0 when their evaluation settings agree, 1 when not.
"""

import sys

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-eval model_paths=[run/checkpoints/last.ckpt] data_dir=/data",
    "smooseg-eval 'model_paths=runs/*/checkpoints/best-*.ckpt' data_dir=/data crf=false",
    "smooseg-eval --compare runA/eval/last-1a2b3c4d5e/metrics.json runB/eval/last-6f7a8b9c0d/metrics.json",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.eval.evaluate import run_eval  # heavy imports only once a run starts (not for --cfg/--help)
    from smooseg.settings import eval_settings
    from smooseg.signals import sigterm_stops

    settings = eval_settings(cfg)
    with sigterm_stops(f"stopped by SIGTERM during the evaluation: the results finished so far are kept in "
                       f"{settings.output_dir}, no summary was written; run the same command again"):
        run_eval(settings)


def compare(argv):
    """``--compare A B``: exit status 0 when the settings agree, 1 when not, 2 on bad input."""
    from smooseg.errors import SmoosegError
    from smooseg.eval.provenance import compare_files

    if len(argv) != 2:
        print("error: --compare takes two files: --compare a/metrics.json b/metrics.json", file=sys.stderr)
        return 2
    try:
        text, same = compare_files(*argv)
    except SmoosegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0 if same else 1


def main():
    """The ``smooseg-eval`` program."""
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(sys.argv[2:]))
    launch(task, "eval", __doc__, EXAMPLES)
