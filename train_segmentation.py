"""Train SmooSeg: python train_segmentation.py experiment=cityscapes_vits8 [key=value | --key value ...]

The config is configs/train.yaml composed with the groups dataset/, model/, trainer/, logger/
and experiment/. Checkpoints (best by validation mIoU, and last.ckpt) go to
<output_dir>/checkpoints, TensorBoard logs to <output_dir>/tensorboard.
"""

import hydra

from smooseg.cli import prepare_argv, report_errors


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@report_errors
def main(cfg):
    from smooseg.train.train import train  # heavy imports only once a run starts (not for --cfg/--help)

    train(cfg)


if __name__ == "__main__":
    prepare_argv()
    main()
