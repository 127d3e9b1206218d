"""python eval_segmentation.py ... runs the smooseg-eval program (smooseg/commands/eval.py)."""

from smooseg.commands.eval import main

if __name__ == "__main__":
    main()
