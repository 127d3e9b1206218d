"""Write the pre-cropped training sets (five or random crops), resumably and in parallel.

    python crop_datasets.py data_dir=/data datasets=[cityscapes,cocostuff27] crop_types=[five]
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.data.crops import crop_datasets
from smooseg.settings import CROP, check_settings


@hydra.main(config_path="smooseg/configs", config_name="crop", version_base="1.3")
@report_errors
def main(cfg):
    check_settings(cfg, CROP)
    summary = crop_datasets(
        data_dir=cfg.data_dir, datasets=list(cfg.datasets), splits=list(cfg.splits),
        crop_types=list(cfg.crop_types), ratio=cfg.crop_ratio, seed=cfg.seed,
        num_workers=cfg.num_workers, jpeg_quality=cfg.jpeg_quality,
        dir_name=cfg.dir_dataset_name, n_classes=cfg.dir_dataset_n_classes,
        progress=cfg.progress)
    for folder, result in summary.items():
        print(f"{folder}: {result['images']} images, {result['written']} files written")


if __name__ == "__main__":
    prepare_argv()
    main()
