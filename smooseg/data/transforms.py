"""Joint image/label transforms (docs/method.md §7).

One :class:`JointTransform` applies the *same* geometry to an image and its label map:
resize the shorter side to ``res`` (labels always NEAREST; images NEAREST by default — a
reference quirk — or BILINEAR), crop ``center`` / ``random`` / ``none`` to ``res``×``res``,
then ToTensor and ImageNet normalisation. Random crops draw from an explicit
``torch.Generator`` handed in by the caller; the global RNG is never touched.
"""

import numpy as np
import torch
from PIL import Image

from smooseg.errors import SmoosegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROPS = ("center", "random", "none")
IMAGE_INTERPS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}


def _stats(img):
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return mean, std


def normalize(img):
    """ImageNet-normalise a float image ``[..., 3, H, W]`` with values in [0, 1]."""
    mean, std = _stats(img)
    return (img - mean) / std


def unnormalize(img):
    """Invert :func:`normalize`: back to [0, 1] RGB (not clamped)."""
    mean, std = _stats(img)
    return img * std + mean


def resized_size(h, w, res):
    """(height, width) after resizing the shorter side to ``res`` (torchvision's rounding)."""
    if h <= w:
        return res, int(res * w / h)
    return int(res * h / w), res


def crop_box(h, w, res, crop, generator=None):
    """Box ``(top, left, height, width)`` of a ``res``×``res`` crop of an h×w image.

    ``center`` rounds like torchvision's CenterCrop; ``random`` draws the corner uniformly
    from ``generator`` (a ``torch.Generator``); ``none`` returns the whole image.
    """
    if crop == "none":
        return 0, 0, h, w
    if res > h or res > w:
        raise SmoosegError(f"crop {res}x{res} is larger than the {h}x{w} image; lower res")
    if crop == "center":
        return int(round((h - res) / 2.0)), int(round((w - res) / 2.0)), res, res
    if crop == "random":
        top = int(torch.randint(0, h - res + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - res + 1, (1,), generator=generator))
        return top, left, res, res
    raise SmoosegError(f"unknown crop '{crop}'; use one of {', '.join(CROPS)}")


def to_tensor(image):
    """PIL RGB image -> float tensor 3×H×W in [0, 1] (as torchvision's ToTensor)."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def label_to_pil(label):
    """Integer label map (H×W, -1 = ignore) as a 32-bit PIL image, so NEAREST keeps ids exactly."""
    return Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))


class JointTransform:
    """Resize-shorter-side, crop and normalise an (image, label) pair with one geometry.

    ``res=None`` keeps the original size (no resize, no crop).
    """

    def __init__(self, res, crop="center", image_interp="nearest", normalize_image=True):
        if crop not in CROPS:
            raise SmoosegError(f"unknown crop '{crop}'; use one of {', '.join(CROPS)}")
        if image_interp not in IMAGE_INTERPS:
            raise SmoosegError(
                f"unknown image_interp '{image_interp}'; use one of {', '.join(IMAGE_INTERPS)}")
        self.res = None if res is None else int(res)
        self.crop = crop
        self.image_interp = IMAGE_INTERPS[image_interp]
        self.normalize_image = normalize_image

    def __call__(self, image, label=None, generator=None):
        """Return ``(img Float[3,H,W], label Long[H,W])``; a missing label becomes all -1."""
        image = image.convert("RGB")
        lab = label_to_pil(label) if isinstance(label, np.ndarray) else label
        if self.res is not None:
            h, w = resized_size(image.height, image.width, self.res)
            image = image.resize((w, h), self.image_interp)
            if lab is not None:
                lab = lab.resize((w, h), Image.NEAREST)
            top, left, ch, cw = crop_box(h, w, self.res, self.crop, generator)
            image = image.crop((left, top, left + cw, top + ch))
            if lab is not None:
                lab = lab.crop((left, top, left + cw, top + ch))
        img = to_tensor(image)
        if self.normalize_image:
            img = normalize(img)
        if lab is None:
            target = torch.full(img.shape[1:], -1, dtype=torch.long)
        else:
            target = torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())
        return img, target


def to_uint8_image(img):
    """Un-normalised 3×H×W image in [0, 1] (tensor or array) -> H×W×3 uint8, ×255 then truncation."""
    img = torch.as_tensor(img)
    if img.ndim != 3 or img.shape[0] != 3:
        raise SmoosegError(f"to_uint8_image: expected a 3×H×W image, got shape {tuple(img.shape)}; "
                           "pass one un-normalised image in channel-first layout")
    if not img.is_floating_point():
        raise SmoosegError(f"to_uint8_image: expected a float image in [0, 1], got {img.dtype}; "
                           "pass the un-normalised float image (uint8 images need no conversion)")
    scaled = (img.detach() * 255).clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(scaled.permute(1, 2, 0).cpu().numpy())
