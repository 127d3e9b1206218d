"""Download and extract the data archives the published pipeline uses.

    python download_datasets.py data_dir=/data datasets=[cityscapes]
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.data.download import download_datasets
from smooseg.settings import download_settings


@hydra.main(config_path="smooseg/configs", config_name="download", version_base="1.3")
@report_errors
def main(cfg):
    settings = download_settings(cfg)
    status = download_datasets(
        data_dir=settings.data_dir, names=settings.datasets, base_url=settings.base_url,
        keep_archive=settings.keep_archive, sizes=settings.sizes, checksums=settings.sha256,
        progress=settings.progress, timeout=settings.timeout)
    for name, state in status.items():
        print(f"{name}: {'already present' if state == 'present' else 'downloaded'} "
              f"in {settings.data_dir}/{name}")


if __name__ == "__main__":
    prepare_argv()
    main()
