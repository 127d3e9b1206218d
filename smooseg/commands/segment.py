"""Segment your own images: a colour mask and an overlay per image (optionally the raw cluster
ids) at the image's original size.

Resize or sliding-window inference, optional dense CRF, and class colours plus a legend when
metrics_json=<eval metrics.json> is given. Config: smooseg/configs/segment.yaml.
"""

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-segment model_path=run/checkpoints/last.ckpt input_dir=photos",
    "smooseg-segment model_path=m.ckpt input_dir=photos mode=window crf=true "
    "metrics_json=eval/m/metrics.json",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="segment", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.eval.segment import run_segment  # heavy imports only once a run starts (not for --help)
    from smooseg.settings import segment_settings
    from smooseg.signals import sigterm_stops

    settings = segment_settings(cfg)
    with sigterm_stops(f"stopped by SIGTERM while segmenting into {settings.output_dir}: every picture "
                       f"written is complete; run the same command again to segment all the images"):
        run_segment(settings)


def main():
    """The ``smooseg-segment`` program."""
    launch(task, "segment", __doc__, EXAMPLES)
