"""python train_segmentation.py ... runs the smooseg-train program (smooseg/commands/train.py)."""

from smooseg.commands.train import main

if __name__ == "__main__":
    main()
