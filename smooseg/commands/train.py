"""Train SmooSeg: frozen ViT features, a projector and teacher/student cluster prototypes shaped by
the smoothness loss; the best checkpoint is then evaluated.

The config is smooseg/configs/train.yaml composed with the groups dataset/, model/, trainer/,
logger/ and experiment/. Checkpoints (best by validation mIoU, and last.ckpt) go to
<output_dir>/checkpoints, logs to the chosen logger (TensorBoard: <output_dir>/tensorboard); the
best checkpoint is then evaluated (final_eval.*: <output_dir>/final_eval/metrics.json). Several
seeds: -m seed=0,1,2,3,4 trains job n in <output_dir>/<n>/ and writes the summary over the jobs to
<output_dir>/summary.json (add hydra/launcher=submitit_slurm to submit one SLURM job per seed).

An output_dir that holds a run is refused unless resumed (ckpt_path=last); one that a running
training holds (<output_dir>/.lock) is refused. SIGTERM saves checkpoints/last.ckpt at the step
reached and exits with status 143.
"""

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-train experiment=cityscapes_vits8 data_dir=/data trainer=gpu",
    "smooseg-train experiment=cocostuff27_vits8 data_dir=/data logger=wandb logger.project=my-project",
    "smooseg-train -m experiment=cityscapes_vits8 data_dir=/data output_dir=runs/cs seed=0,1,2 "
    "hydra/launcher=submitit_slurm hydra.launcher.partition=gpu",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.logs import quiet_known_noise
    from smooseg.settings import train_settings
    from smooseg.sweep import continue_run, job_output_dir, resume_if_requeued
    from smooseg.train.train import train  # heavy imports only once a run starts (not for --cfg/--help)

    settings = continue_run(resume_if_requeued(train_settings(job_output_dir(cfg))))
    if settings is None:
        return None
    quiet_known_noise()
    return train(settings)


def main():
    """The ``smooseg-train`` program."""
    launch(task, "train", __doc__, EXAMPLES)
