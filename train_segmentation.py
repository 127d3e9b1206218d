"""Train SmooSeg: python train_segmentation.py experiment=cityscapes_vits8 [key=value | --key value ...]

The config is smooseg/configs/train.yaml composed with the groups dataset/, model/, trainer/, logger/
and experiment/. Checkpoints (best by validation mIoU, and last.ckpt) go to
<output_dir>/checkpoints, TensorBoard logs to <output_dir>/tensorboard; the best checkpoint is
then evaluated (final_eval.*: <output_dir>/final_eval/metrics.json). Several seeds:
python train_segmentation.py -m experiment=... seed=0,1,2,3,4 trains job n in <output_dir>/<n>/
and writes the summary over the jobs to <output_dir>/summary.json.

An output_dir that holds a run is refused unless resumed (ckpt_path=last); one that a running
training holds (<output_dir>/.lock) is refused. ckpt_path=auto finishes whatever the folder holds
(a stopped -m sweep: the same command with ckpt_path=auto). SIGTERM saves checkpoints/last.ckpt
at the step reached and exits with status 143.
"""

import hydra

from smooseg.cli import prepare_argv, report_errors


@hydra.main(config_path="smooseg/configs", config_name="train", version_base="1.3")
@report_errors
def main(cfg):
    from smooseg.sweep import continue_run, job_output_dir
    from smooseg.train.train import train  # heavy imports only once a run starts (not for --cfg/--help)

    cfg = continue_run(job_output_dir(cfg))
    return None if cfg is None else train(cfg)


if __name__ == "__main__":
    prepare_argv()
    main()
