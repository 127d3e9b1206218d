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
    from smooseg.settings import download_settings

    settings = download_settings(cfg)
    status = download_datasets(
        data_dir=settings.data_dir, names=settings.datasets, base_url=settings.base_url,
        keep_archive=settings.keep_archive, sizes=settings.sizes, checksums=settings.sha256,
        progress=settings.progress, timeout=settings.timeout)
    for name, state in status.items():
        print(f"{name}: {'already present' if state == 'present' else 'downloaded'} "
              f"in {settings.data_dir}/{name}")


def main():
    """The ``smooseg-download`` program."""
    launch(task, "download", __doc__, EXAMPLES)
