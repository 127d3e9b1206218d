"""python download_datasets.py ... runs the smooseg-download program (smooseg/commands/download.py)."""

from smooseg.commands.download import main

if __name__ == "__main__":
    main()
