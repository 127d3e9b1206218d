"""Evaluate checkpoints: python eval_segmentation.py model_paths=[a.ckpt,b.ckpt] [crf=false ...]

Flip averaging, optional dense CRF and Hungarian metrics on the checkpoint's data set (or
dataset=...). Prints a per-class IoU table and writes <output_dir>/<checkpoint>/metrics.json
plus coloured PNGs of the first n_images images, then the summary over the checkpoints (mean ±
sample std, min, max of mIoU and Accuracy) in <output_dir>/summary.json. model_paths entries may
be glob patterns: model_paths='runs/*/checkpoints/best-*.ckpt'. Config: smooseg/configs/eval.yaml.

Compare two results: python eval_segmentation.py --compare a/metrics.json b/metrics.json prints
their provenance side by side and exits 0 when their evaluation settings agree, 1 when not.
"""

import sys

import hydra

from smooseg.cli import prepare_argv, report_errors


@hydra.main(config_path="smooseg/configs", config_name="eval", version_base="1.3")
@report_errors
def main(cfg):
    from smooseg.eval.evaluate import run_eval  # heavy imports only once a run starts (not for --cfg/--help)

    run_eval(cfg)


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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(sys.argv[2:]))
    prepare_argv()
    main()
