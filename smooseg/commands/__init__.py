"""The command-line programs, one module per program: each holds the Hydra task and ``main()``,
the function its console script (``smooseg-train`` ...) and its top-level script
(``train_segmentation.py`` ...) call. Their configs are the package's ``smooseg/configs/``."""
