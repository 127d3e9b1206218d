"""Joint image/label transforms (docs/method.md §7)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from smooseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JointTransform,
    crop_box,
    normalize,
    resized_size,
    unnormalize,
)
from smooseg.errors import SmoosegError


def position_pair(h, w):
    """Image whose R,G encode x,y and a label holding y*w + x (with a few -1 pixels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)
    label = (yy * w + xx).astype(np.int64)
    label[::7, ::5] = -1
    return Image.fromarray(img), label


def decode_positions(img_tensor, w):
    rgb = torch.round(unnormalize(img_tensor) * 255).to(torch.long)
    return rgb[1] * w + rgb[0]


def test_normalize_by_hand():
    img = torch.ones(3, 2, 2)
    out = normalize(img)
    for c in range(3):
        assert torch.allclose(out[c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
    mean_img = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 5)
    assert torch.allclose(normalize(mean_img), torch.zeros(3, 4, 5), atol=1e-6)


def test_unnormalize_inverts_normalize_batched():
    img = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    assert torch.allclose(unnormalize(normalize(img)), img)


def test_resized_size_shorter_side():
    assert resized_size(100, 200, 50) == (50, 100)
    assert resized_size(200, 100, 50) == (100, 50)
    assert resized_size(75, 100, 64) == (64, 85)      # int(64 * 100 / 75) = 85
    assert resized_size(32, 32, 16) == (16, 16)


def test_crop_box_center_and_none():
    assert crop_box(10, 15, 4, "center") == (3, 6, 4, 4)   # round(3.0), round(5.5)
    assert crop_box(10, 15, 4, "none") == (0, 0, 10, 15)
    with pytest.raises(SmoosegError, match="larger"):
        crop_box(3, 15, 4, "center")
    with pytest.raises(SmoosegError, match="unknown crop"):
        crop_box(10, 15, 4, "diagonal")


def test_random_crop_box_uses_generator_and_stays_inside():
    boxes = {crop_box(20, 30, 8, "random", torch.Generator().manual_seed(s)) for s in range(40)}
    assert len(boxes) > 10
    for top, left, h, w in boxes:
        assert 0 <= top <= 12 and 0 <= left <= 22 and (h, w) == (8, 8)
    state = torch.get_rng_state()
    a = crop_box(20, 30, 8, "random", torch.Generator().manual_seed(3))
    b = crop_box(20, 30, 8, "random", torch.Generator().manual_seed(3))
    assert a == b
    assert torch.equal(state, torch.get_rng_state())   # the global RNG is untouched


@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_label_stays_aligned_with_image_under_random_crops(interp):
    h, w = 40, 64
    image, label = position_pair(h, w)
    transform = JointTransform(24, crop="random", image_interp=interp)
    corners = set()
    for seed in range(12):
        img, target = transform(image, label, generator=torch.Generator().manual_seed(seed))
        assert img.shape == (3, 24, 24) and target.shape == (24, 24)
        assert target.dtype == torch.long
        valid = target >= 0
        assert valid.float().mean() > 0.8
        if interp == "nearest":
            assert torch.equal(decode_positions(img, w)[valid], target[valid])
        corners.add(int(target[valid].min()))
    assert len(corners) > 3


def test_label_ids_survive_nearest_resize_exactly():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 255, (37, 53))
    as_l = Image.fromarray(label.astype(np.uint8)).resize((32, 23), Image.NEAREST)  # 23*53/37
    _, target = JointTransform(23, crop="none")(Image.new("RGB", (53, 37)), label)
    assert torch.equal(target, torch.from_numpy(np.asarray(as_l).astype(np.int64)))
    big = np.full((4, 4), 70000, dtype=np.int64)
    big[0, 0] = -1
    _, target = JointTransform(None)(Image.new("RGB", (4, 4)), big)
    assert int(target[0, 0]) == -1 and int(target[3, 3]) == 70000


def test_center_crop_matches_torchvision_reference_pipeline():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(32, T.InterpolationMode.NEAREST), T.CenterCrop(32),
                           T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    img, target = JointTransform(32, crop="center")(image, None)
    assert torch.allclose(img, reference(image), atol=1e-6)
    assert torch.equal(target, torch.full((32, 32), -1, dtype=torch.long))
    bilinear = T.Compose([T.Resize(32, T.InterpolationMode.BILINEAR), T.CenterCrop(32),
                          T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    img_b, _ = JointTransform(32, crop="center", image_interp="bilinear")(image, None)
    assert torch.allclose(img_b, bilinear(image), atol=1e-6)
    assert not torch.allclose(img_b, img)


def test_no_crop_keeps_aspect_ratio():
    image, label = position_pair(30, 60)
    img, target = JointTransform(15, crop="none")(image, label)
    assert img.shape == (3, 15, 30) and target.shape == (15, 30)
    assert torch.equal(decode_positions(img, 60)[target >= 0], target[target >= 0])


def test_bad_options_raise():
    with pytest.raises(SmoosegError, match="image_interp"):
        JointTransform(32, image_interp="cubic")
    with pytest.raises(SmoosegError, match="crop"):
        JointTransform(32, crop="five")
