"""SmooSeg: smoothness prior for unsupervised semantic segmentation.

The public surface (docs/python.md): ``load`` (a :class:`Segmenter` of a checkpoint),
``train_settings`` / ``train``, ``eval_settings`` / ``evaluate`` and ``backbones``. They are
imported on first use, so ``import smooseg`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["Segmentation", "Segmenter", "backbones", "eval_settings", "evaluate", "load", "train",
           "train_settings"]


def __getattr__(name):
    if name == "train":  # the training package is callable as smooseg.train(...) (smooseg.api.train)
        import smooseg.train

        return smooseg.train
    if name in __all__:
        from smooseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'smooseg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
