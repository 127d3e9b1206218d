"""python crop_datasets.py ... runs the smooseg-crop program (smooseg/commands/crop.py)."""

from smooseg.commands.crop import main

if __name__ == "__main__":
    main()
