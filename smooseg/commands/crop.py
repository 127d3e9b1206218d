"""Write the pre-cropped training sets (five or random crops), resumably and in parallel.

Crops go to <data_dir>/cropped/<dataset>_<crop_type>_crop_<crop_ratio>/; re-running resumes.
Config: smooseg/configs/crop.yaml.
"""

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-crop data_dir=/data datasets=[cityscapes,cocostuff27] crop_types=[five]",
    "smooseg-crop data_dir=/data datasets=[directory] dir_dataset_name=mine dir_dataset_n_classes=5",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="crop", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.data.crops import crop_datasets
    from smooseg.settings import crop_settings

    settings = crop_settings(cfg)
    summary = crop_datasets(
        data_dir=settings.data_dir, datasets=settings.datasets, splits=settings.splits,
        crop_types=settings.crop_types, ratio=settings.crop_ratio, seed=settings.seed,
        num_workers=settings.num_workers, jpeg_quality=settings.jpeg_quality,
        dir_name=settings.dir_dataset_name, n_classes=settings.dir_dataset_n_classes,
        progress=settings.progress)
    for folder, result in summary.items():
        print(f"{folder}: {result['images']} images, {result['written']} files written")


def main():
    """The ``smooseg-crop`` program."""
    launch(task, "crop", __doc__, EXAMPLES)
