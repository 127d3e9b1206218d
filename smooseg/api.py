"""The Python API (docs/python.md): load a checkpoint and segment images in a notebook, and run an
evaluation or a training as the scripts would.

``load(path)`` gives a :class:`Segmenter`; ``Segmenter.segment`` takes a PIL image, an H×W×3
uint8 array, a 3×H×W tensor (uint8, or float in [0, 1]) or an image file's path, of any size, and
fits it to the patch size itself exactly as ``segment_images.py`` does (same
:func:`smooseg.eval.predict.predict_image`, same options), so both give the same ids.

The cluster -> class matching is not part of a checkpoint: an evaluation finds it and writes it
in its ``metrics.json``. Pass that file as ``load(path, matching=".../metrics.json")``; it is
refused unless it records this checkpoint's sha256.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from smooseg.errors import SmoosegError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class Segmentation(NamedTuple):
    """One image's result: ``clusters`` (H×W int64 cluster ids at the input's size) and ``classes``
    (H×W int64 class ids, −1 where the cluster is unmatched; None without a matching)."""

    clusters: np.ndarray
    classes: np.ndarray | None


def as_rgb_array(image):
    """H×W×3 uint8 of a PIL image (EXIF orientation applied, as for files), an H×W×3 uint8
    array, a 3×H×W tensor (uint8, or float in [0, 1]) or an image file's path."""
    from smooseg.eval.segment import read_image

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3:
            raise SmoosegError(f"segment: a tensor must be 3×H×W, got shape {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return image.detach().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise SmoosegError(f"segment: an array must be H×W×3 uint8, got shape {array.shape} {array.dtype}; "
                           "convert it, e.g. np.asarray(pil_image.convert('RGB'))")
    return array


class Segmenter:
    """A loaded SmooSeg net that segments images (:func:`load` builds one).

    ``options`` (:class:`smooseg.eval.predict.PredictOptions`) say how images are fitted to the
    patch size; ``class_map`` (cluster -> class, −1 unmatched) and ``class_names`` come from a
    matching; ``crf_backend`` is the dense CRF used when ``segment(crf=True)``.
    """

    def __init__(self, net, data, options, class_map=None, class_names=None, crf_backend="auto"):
        self.net, self.data, self.options = net, data, options
        self.class_map = None if class_map is None else np.asarray(class_map, dtype=np.int64)
        self.class_names = list(data.class_names if class_names is None else class_names)
        self.crf_backend = crf_backend
        self._crf = None

    @property
    def device(self):
        return next(self.net.parameters()).device

    @property
    def n_clusters(self):
        return self.net.n_clusters

    def _crf_pool(self):
        from smooseg.eval.crf_backend import open_crf

        if self._crf is None:
            self._crf = open_crf(self.crf_backend, self.device)
        return self._crf

    def _result(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        return Segmentation(ids, None if self.class_map is None else self.class_map[ids])

    @torch.no_grad()
    def segment(self, images, crf=False, flip=None):
        """A :class:`Segmentation` of one image, or a list of them for a list of images (batched:
        images of one size go through the network together, their dense CRF, with ``crf``, runs
        as one batch). ``flip`` (default: the loaded options') averages with the horizontally
        flipped image."""
        from dataclasses import replace

        from smooseg.eval.crf_memory import CRF_MAX_PIXELS, crf_image, crf_shape, refined_ids
        from smooseg.eval.predict import predict_images

        many = isinstance(images, (list, tuple))
        arrays = [as_rgb_array(image) for image in (images if many else [images])]
        options = self.options if flip is None else replace(self.options, flip=bool(flip))
        sizes = [crf_shape(*a.shape[:2], CRF_MAX_PIXELS) if crf else None for a in arrays]
        predicted = predict_images(self.net, arrays, options, keep_log_probs=crf, log_sizes=sizes)
        if crf:
            handle = self._crf_pool().submit([crf_image(a, s) for a, s in zip(arrays, sizes, strict=True)],
                                             [log_probs for _, log_probs in predicted])
            ids = [refined_ids(p, a.shape[:2]) for p, a in zip(handle.result(), arrays, strict=True)]
        else:
            ids = [i for i, _ in predicted]
        results = [self._result(i) for i in ids]
        return results if many else results[0]

    def close(self):
        """Stop the CRF workers, if any were started."""
        if self._crf is not None:
            self._crf.close()
            self._crf = None


def load(path, device="auto", matching=None, mode="resize", size=320, stride=None, flip=True,
         batch_size=8, precision="32", crf_backend="auto"):
    """A :class:`Segmenter` of the checkpoint at ``path`` (this package's or the reference
    release's) on ``device``; ``matching``: the ``metrics.json`` of an evaluation of this
    checkpoint, for class ids and names. The other keys are those of ``segment_images.py``."""
    from smooseg.data.datasets import DatasetInfo
    from smooseg.eval.predict import PredictOptions
    from smooseg.eval.provenance import file_sha256
    from smooseg.eval.segment import class_map_from_metrics
    from smooseg.io import check_input_file
    from smooseg.model.checkpoints import load_net
    from smooseg.runtime import resolve_device

    options = PredictOptions(mode=mode, size=size, stride=stride, flip=flip, batch_size=batch_size,
                             precision=str(precision))
    check_input_file(path, "path", missing="not found", fix="pass the path of a .ckpt file")
    device = resolve_device(device)
    net, hparams = load_net(path, map_location=device)
    net.backbone_precision = options.precision
    options.fitted(net.patch_size)
    data = DatasetInfo(**hparams["data"])
    class_map = names = None
    if matching is not None:
        class_map, names = class_map_from_metrics(matching, net.n_clusters, data.n_classes,
                                                  checkpoint_sha256=file_sha256(path))
        class_map = class_map.numpy()
    return Segmenter(net, data, options, class_map, names, crf_backend)


def _compose(config_name, overrides):
    from hydra import compose, initialize_config_dir

    import smooseg.settings  # noqa: F401  (registers the typed schemas the configs compose on)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def train_settings(*overrides):
    """The checked, resolved :class:`smooseg.settings.TrainSettings` of ``train_segmentation.py``
    with these ``key=value`` overrides (every ``auto`` resolved, as the script records it)."""
    from smooseg import settings

    return settings.train_settings(_compose("train", overrides))


def eval_settings(*overrides):
    """The checked, resolved :class:`smooseg.settings.EvalSettings` of ``eval_segmentation.py``."""
    from smooseg import settings

    return settings.eval_settings(_compose("eval", overrides))


def _typed(args, cls_name, make):
    from smooseg import settings

    if len(args) == 1 and isinstance(args[0], getattr(settings, cls_name)):
        return args[0]
    if all(isinstance(arg, str) for arg in args):
        return make(*args)
    raise TypeError(f"pass one {cls_name} or key=value override strings")


def evaluate(*args):
    """Evaluate as ``eval_segmentation.py``: ``evaluate(settings)`` with an :class:`EvalSettings`
    (from :func:`eval_settings`, changed as you like), or ``evaluate("key=value", ...)``; returns the
    metrics dict of each checkpoint (what its ``metrics.json`` holds)."""
    from smooseg.eval.evaluate import run_eval

    return run_eval(_typed(args, "EvalSettings", eval_settings))


def train(*args):
    """Train as ``train_segmentation.py`` (one run, no sweep): ``train(settings)`` with a
    :class:`TrainSettings` (from :func:`train_settings`), or ``train("key=value", ...)``; returns
    what the training returns (checkpoint paths, best mIoU, the final evaluation's headline)."""
    from smooseg.train.train import train as run_train

    return run_train(_typed(args, "TrainSettings", train_settings))


def backbones():
    """The backbones a net can be built on, as ``arch/model_type/patch_size`` names."""
    from smooseg.model.backbones import list_backbones

    return list_backbones()
