"""Dense CRF refinement with pydensecrf (docs/method.md §5), one image at a time on the CPU.

:mod:`smooseg.eval.crf_pool` runs it over batches in a process pool; :mod:`smooseg.eval.crf_torch`
computes the same model in PyTorch (CPU or GPU).  pydensecrf is imported when a CRF first runs,
so evaluation without CRF and with ``crf_backend=torch`` works where it is not installed.
"""

import numpy as np
import torch
import torch.nn.functional as F

from smooseg.data.transforms import to_uint8_image
from smooseg.errors import SmoosegError


def _as_uint8_hwc(image):
    """Accept an H×W×3 uint8 array as is; convert a float 3×H×W image with to_uint8_image."""
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise SmoosegError(f"dense CRF: uint8 image must be H×W×3 RGB, got shape {image.shape}; "
                               "convert it with smooseg.data.transforms.to_uint8_image")
        return image
    return to_uint8_image(image)


def _as_float32_numpy(log_probs):
    """Log-probabilities as a K×h×w float32 CPU numpy array (what is pickled to workers)."""
    if isinstance(log_probs, torch.Tensor):
        log_probs = log_probs.detach().float().cpu().numpy()
    log_probs = np.asarray(log_probs, dtype=np.float32)
    if log_probs.ndim != 3:
        raise SmoosegError(f"dense CRF: log_probs must be K×h×w, got shape {log_probs.shape}; "
                           "pass one image's cluster log-probabilities at a time")
    return log_probs


def _pydensecrf():
    """(pydensecrf.densecrf, pydensecrf.utils.unary_from_softmax); a SmoosegError naming the way
    out when pydensecrf2 is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise SmoosegError(f"crf_backend=pydensecrf needs the pydensecrf2 package, which cannot be "
                           f"imported here ({err}); pip install pydensecrf2, or use crf_backend=torch "
                           "or crf=false") from None
    return dcrf, unary_from_softmax


def dense_crf(image, log_probs, iters=10, gaussian_sxy=1, gaussian_compat=3,
              bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4):
    """Fully connected CRF on one image; returns K×H×W float32 per-pixel marginals.

    ``image`` is H×W×3 uint8 RGB; ``log_probs`` is K×h×w and is resized bilinearly to H×W.
    The bilateral term sees the image in BGR order, as the reference implementation feeds it.
    """
    dcrf, unary_from_softmax = _pydensecrf()
    image = _as_uint8_hwc(image)
    log_probs = _as_float32_numpy(log_probs)
    height, width = image.shape[:2]
    n_classes = log_probs.shape[0]
    resized = F.interpolate(torch.from_numpy(log_probs)[None], size=(height, width),
                            mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(resized, dim=0).numpy()
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=bgr, compat=bilateral_compat)
    marginals = np.array(crf.inference(iters), dtype=np.float32)
    return marginals.reshape(n_classes, height, width)


def dense_crf_labels(image, log_probs, **params):
    """The CRF's per-pixel argmax H×W (int16): what evaluation needs, 2·K times less to send back."""
    return dense_crf(image, log_probs, **params).argmax(0).astype(np.int16)
