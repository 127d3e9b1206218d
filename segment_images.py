"""Segment your own images: python segment_images.py model_path=m.ckpt input_dir=photos [...]

Writes a colour mask and an overlay per image (optionally the raw cluster ids) at the image's
original size, with resize or sliding-window inference, optional dense CRF, and class colours
plus a legend when metrics_json=<eval metrics.json> is given. Config: smooseg/configs/segment.yaml.
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.eval.segment import run_segment
from smooseg.settings import segment_settings


@hydra.main(config_path="smooseg/configs", config_name="segment", version_base="1.3")
@report_errors
def main(cfg):
    run_segment(segment_settings(cfg))


if __name__ == "__main__":
    prepare_argv()
    main()
