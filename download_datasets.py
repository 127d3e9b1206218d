"""Download and extract the data archives the published pipeline uses.

    python download_datasets.py data_dir=/data datasets=[cityscapes]
"""

import hydra

from smooseg.cli import prepare_argv, report_errors
from smooseg.data.download import download_datasets
from smooseg.settings import DOWNLOAD, check_settings


@hydra.main(config_path="smooseg/configs", config_name="download", version_base="1.3")
@report_errors
def main(cfg):
    check_settings(cfg, DOWNLOAD)
    status = download_datasets(
        data_dir=cfg.data_dir, names=list(cfg.datasets), base_url=cfg.base_url,
        keep_archive=cfg.keep_archive, sizes=cfg.sizes, checksums=cfg.sha256,
        progress=cfg.progress, timeout=cfg.timeout)
    for name, state in status.items():
        print(f"{name}: {'already present' if state == 'present' else 'downloaded'} "
              f"in {cfg.data_dir}/{name}")


if __name__ == "__main__":
    prepare_argv()
    main()
