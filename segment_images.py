"""python segment_images.py ... runs the smooseg-segment program (smooseg/commands/segment.py)."""

from smooseg.commands.segment import main

if __name__ == "__main__":
    main()
