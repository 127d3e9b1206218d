"""Download and extract the data archives the published pipeline uses into data_dir.

Resumes partial downloads, verifies sizes (and sha256 where given), extracts to
<data_dir>/<name>/ and skips data sets already there. Config: smooseg/configs/download.yaml.
"""

import hydra

from smooseg.cli import report_errors
from smooseg.commands.launch import CONFIG_DIR, launch

EXAMPLES = (
    "smooseg-download data_dir=/data datasets=[cityscapes]",
    "smooseg-download data_dir=/data datasets=[cocostuff,potsdam] keep_archive=true",
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="download", version_base="1.3")
@report_errors
def task(cfg):
    from smooseg.data.download import download_datasets
    from smooseg.settings import DOWNLOAD, check_settings

    check_settings(cfg, DOWNLOAD)
    status = download_datasets(
        data_dir=cfg.data_dir, names=list(cfg.datasets), base_url=cfg.base_url,
        keep_archive=cfg.keep_archive, sizes=cfg.sizes, checksums=cfg.sha256,
        progress=cfg.progress, timeout=cfg.timeout)
    for name, state in status.items():
        print(f"{name}: {'already present' if state == 'present' else 'downloaded'} "
              f"in {cfg.data_dir}/{name}")


def main():
    """The ``smooseg-download`` program."""
    launch(task, "download", __doc__, EXAMPLES)
