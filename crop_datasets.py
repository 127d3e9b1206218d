"""Write the pre-cropped training sets (five or random crops), resumably and in parallel.

    python crop_datasets.py data_dir=/data datasets=[cityscapes,cocostuff27] crop_types=[five]
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.data.crops import crop_datasets
from smooseg.settings import crop_settings


@hydra.main(config_path="smooseg/configs", config_name="crop", version_base="1.3")
@report_errors
def main(cfg):
    settings = crop_settings(cfg)
    summary = crop_datasets(
        data_dir=settings.data_dir, datasets=settings.datasets, splits=settings.splits,
        crop_types=settings.crop_types, ratio=settings.crop_ratio, seed=settings.seed,
        num_workers=settings.num_workers, jpeg_quality=settings.jpeg_quality,
        dir_name=settings.dir_dataset_name, n_classes=settings.dir_dataset_n_classes,
        progress=settings.progress)
    for folder, result in summary.items():
        print(f"{folder}: {result['images']} images, {result['written']} files written")


if __name__ == "__main__":
    prepare_argv()
    main()
