"""Which dense CRF runs: ``crf_backend`` = ``pydensecrf`` (one image per CPU core, in the process
pool of :mod:`smooseg.eval.crf_pool`), ``torch`` (:func:`smooseg.eval.crf_torch.dense_crf_torch`,
a batch at a time on the evaluation device) or ``auto``.

Both compute the same model (docs/method.md §5) and offer the same ``submit(images, log_probs,
labels=False)`` -> handle (``done()``, ``result()``) interface, so evaluation and segmentation
run either without knowing which.  ``auto`` is ``torch`` on a CUDA device and ``pydensecrf`` on a
CPU, where it is the faster of the two (README, Performance).
"""

import numpy as np
import torch

from smooseg.errors import SmoosegError
from smooseg.eval.crf_pool import CRFPool
from smooseg.eval.crf_torch import dense_crf_torch

CRF_BACKENDS = ("auto", "pydensecrf", "torch")


def resolve_backend(backend, device):
    """``pydensecrf`` or ``torch`` for ``crf_backend=backend`` on ``device``."""
    backend = str(backend)
    if backend not in CRF_BACKENDS:
        raise SmoosegError(f"crf_backend={backend} is unknown; use one of {', '.join(CRF_BACKENDS)}")
    if backend == "auto":
        return "torch" if torch.device(device).type == "cuda" else "pydensecrf"
    return backend


class _Done:
    """The handle of work that already finished."""

    def __init__(self, results):
        self._results = results

    def done(self):
        return True

    def result(self):
        return self._results


class TorchCRF:
    """The torch dense CRF behind the CRF pool's interface: each batch runs at once, on ``device``,
    as one call (a batch of equally sized images shares one lattice build)."""

    num_workers = 0

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def submit(self, images, log_probs, labels=False):
        """CRF of a batch of H×W×3 uint8 images (arrays or tensors) and K×h×w log-probs; returns a
        finished handle whose result is a list of K×H×W float32 marginals (or H×W int16 labels)."""
        images = [torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
                  for image in images]
        log_probs = [torch.as_tensor(lp) for lp in log_probs]
        if len(images) != len(log_probs):
            raise SmoosegError(f"dense CRF: {len(images)} images but {len(log_probs)} log-prob maps; "
                               "pass one log-prob map per image")
        same_shapes = (len({tuple(image.shape) for image in images}) == 1
                       and len({tuple(lp.shape) for lp in log_probs}) == 1)
        if same_shapes:
            out = list(self._run(torch.stack(images), torch.stack(log_probs)))
        else:
            out = [self._run(image[None], lp[None])[0] for image, lp in zip(images, log_probs, strict=True)]
        if labels:
            return _Done([m.argmax(0).to(torch.int16).cpu().numpy() for m in out])
        return _Done([m.cpu().numpy() for m in out])

    def _run(self, images, log_probs):
        return dense_crf_torch(images.to(self.device), log_probs.to(self.device, torch.float32))

    def busy_workers(self):
        return 0

    def close(self, wait=True):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_crf(backend, device, num_workers=0, timeout=120.0):
    """The CRF runner for ``crf_backend=backend``: a :class:`CRFPool` (pydensecrf) or a
    :class:`TorchCRF` on ``device``. Close it when done (or use it as a context manager)."""
    if resolve_backend(backend, device) == "torch":
        return TorchCRF(device)
    return CRFPool(num_workers=num_workers, timeout=timeout)
