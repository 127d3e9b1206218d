"""Evaluate checkpoints: python eval_segmentation.py model_paths=[a.ckpt,b.ckpt] [crf=false ...]

Flip averaging, optional dense CRF and Hungarian metrics on the checkpoint's data set (or
dataset=...). Prints a per-class IoU table and writes <output_dir>/<checkpoint>/metrics.json
plus coloured PNGs of the first n_images images, then the summary over the checkpoints (mean ±
sample std, min, max of mIoU and Accuracy) in <output_dir>/summary.json. model_paths entries may
be glob patterns: model_paths='runs/*/checkpoints/best-*.ckpt'. Config: smooseg/configs/eval.yaml.
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.settings import eval_settings


@hydra.main(config_path="smooseg/configs", config_name="eval", version_base="1.3")
@report_errors
def main(cfg):
    from smooseg.eval.evaluate import run_eval  # heavy imports only once a run starts (not for --cfg/--help)

    run_eval(eval_settings(cfg))


if __name__ == "__main__":
    prepare_argv()
    main()
