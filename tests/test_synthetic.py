"""Synthetic street scenes in the Cityscapes and directory layouts."""

import time

import numpy as np
from PIL import Image

from smooseg.data.synthetic import (
    BUILDING,
    CAR,
    DIRECTORY_CLASSES,
    ROAD,
    SIDEWALK,
    SKY,
    VEGETATION,
    street_scene,
    to_directory_ids,
    write_cityscapes_layout,
    write_directory_layout,
)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_cityscapes_layout_files_and_pairs(tmp_path):
    start = time.perf_counter()
    data_dir = write_cityscapes_layout(tmp_path, n_train=5, n_val=3, size=(48, 96), seed=1)
    assert time.perf_counter() - start < 5
    assert data_dir == tmp_path
    for split, count in (("train", 5), ("val", 3)):
        images = sorted((tmp_path / "cityscapes/leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == count
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            label = tmp_path / "cityscapes/gtFine" / split / image.parent.name / (
                f"{stem}_gtFine_labelIds.png")
            assert label.is_file()
            with Image.open(image) as im, Image.open(label) as lab:
                assert im.mode == "RGB" and im.size == (96, 48)
                assert lab.mode == "L" and lab.size == (96, 48)


def test_scenes_have_classes_textures_and_void(tmp_path):
    rng = np.random.default_rng(0)
    means, seen = {}, set()
    for _ in range(6):
        image, lab = street_scene(rng, (64, 128))
        ids = set(np.unique(lab).tolist())
        seen |= ids
        assert {ROAD, SIDEWALK, SKY, CAR} <= ids
        assert (lab < 7).any()                        # void labelIds (ignore)
        for label_id in ids:
            means.setdefault(label_id, []).append(image[lab == label_id].mean(0))
    assert {BUILDING, VEGETATION} <= seen
    colours = {k: np.mean(v, 0) for k, v in means.items()}
    keys = sorted(colours)
    for i, a in enumerate(keys):                      # every class has its own colour
        for b in keys[i + 1:]:
            assert np.abs(colours[a] - colours[b]).max() > 12, (a, b)
    image, lab = street_scene(np.random.default_rng(3), (64, 128))
    assert image[lab == SIDEWALK].std() > 8           # textured, not flat


def test_deterministic_from_seed(tmp_path):
    write_cityscapes_layout(tmp_path / "a", n_train=2, n_val=1, size=(32, 64), seed=5)
    write_cityscapes_layout(tmp_path / "b", n_train=2, n_val=1, size=(32, 64), seed=5)
    write_cityscapes_layout(tmp_path / "c", n_train=2, n_val=1, size=(32, 64), seed=6)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") == _files(tmp_path / "c")
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    diff = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files]
    assert all(same) and not any(diff)


def test_directory_layout_with_and_without_labels(tmp_path):
    data_dir = write_directory_layout(tmp_path, name="mine", n_train=3, n_val=2, size=(40, 40))
    assert data_dir == tmp_path
    imgs = sorted((tmp_path / "mine/imgs/train").iterdir())
    labels = sorted((tmp_path / "mine/labels/train").iterdir())
    assert len(imgs) == len(labels) == 3 and len(list((tmp_path / "mine/imgs/val").iterdir())) == 2
    values = set()
    for label in labels:
        values |= set(np.unique(np.asarray(Image.open(label))).tolist())
    assert values <= set(range(len(DIRECTORY_CLASSES))) | {255}
    assert 255 in values and len(values) >= 5
    write_directory_layout(tmp_path, name="bare", n_train=2, n_val=1, with_labels=False)
    assert not (tmp_path / "bare/labels").exists()
    assert len(list((tmp_path / "bare/imgs/train").iterdir())) == 2


def test_to_directory_ids_by_hand():
    ids = np.array([[ROAD, SIDEWALK, BUILDING], [VEGETATION, SKY, CAR], [0, 1, 17]], np.uint8)
    assert to_directory_ids(ids).tolist() == [[0, 1, 2], [3, 4, 5], [255, 255, 255]]
