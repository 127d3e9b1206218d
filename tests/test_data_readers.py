"""Readers on synthetic instances of each real on-disk layout (docs/method.md §7)."""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from smooseg.data.datasets import (CITYSCAPES_CLASSES, CLASS_NAMES, COCO_FINE, N_CLASSES,
                                   build_dataset)
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout
from smooseg.errors import SmoosegError

# The standard 182 -> 27 table written independently of the reader's name table:
# things as contiguous (first, last, coarse) runs, stuff ids 91..181 one by one.
THING_RUNS = [(0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10),
              (43, 50, 5), (51, 60, 2), (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4)]
STUFF = [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15,
         25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15,
         22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21,
         26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,
         18, 18, 26, 26, 19, 19, 24]
EXPECTED_COCO = {fine: coarse for a, b, coarse in THING_RUNS for fine in range(a, b + 1)}
EXPECTED_COCO.update({91 + i: coarse for i, coarse in enumerate(STUFF)})


def save_png(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- cocostuff27

def make_coco(root, train_ids, val_ids, label_of=None):
    base = root / "cocostuff"
    for native, ids, listname in (("train2017", train_ids, "Coco164kFull_Stuff_Coarse.txt"),
                                  ("val2017", val_ids, "Coco164kFull_Stuff_Coarse_7.txt")):
        (base / "curated" / native).mkdir(parents=True, exist_ok=True)
        (base / "curated" / native / listname).write_text("".join(f"{i}\n" for i in ids))
        for k, i in enumerate(ids):
            label = label_of(i) if label_of else np.full((14, 14), k, np.uint8)
            image_path = base / "images" / native / f"{i}.jpg"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb(*label.shape, k)).save(image_path)
            save_png(label, base / "annotations" / native / f"{i}.png")
    return root


def test_coco_table_matches_standard_map_for_all_182_ids():
    assert len(COCO_FINE) == 182 and len(EXPECTED_COCO) == 182
    assert COCO_FINE[0][0] == "person" and COCO_FINE[91][0] == "banner"
    assert COCO_FINE[181][0] == "wood"


def test_coco_reader_maps_every_fine_id(tmp_path):
    ids = np.r_[np.arange(182), [255, 182, 200, 254], np.zeros(10)].astype(np.uint8)
    grid = ids.reshape(14, 14)
    make_coco(tmp_path, ["000000000139"], ["000000000285"], label_of=lambda i: grid)
    ds = build_dataset("cocostuff27", tmp_path, "train", res=None, crop="none")
    assert len(ds) == 1 and ds.n_classes == 27 and len(ds.class_names) == 27
    _, label = ds.load_raw(0)
    flat = label.reshape(-1)
    for fine in range(182):
        assert flat[fine] == EXPECTED_COCO[fine], fine
    assert flat[182:186].tolist() == [-1, -1, -1, -1]     # 255 void; 182-254 unused -> ignore
    item = ds[0]
    assert item["name"] == "000000000139"
    assert item["label"].dtype == torch.long and item["img"].shape == (3, 14, 14)


def test_coco_splits_use_curated_lists(tmp_path):
    make_coco(tmp_path, ["a1", "a2", "a3"], ["b1", "b2"])
    train = build_dataset("cocostuff27", tmp_path, "train", res=8)
    val = build_dataset("cocostuff27", tmp_path, "val2017", res=8)
    assert [train.item_name(i) for i in range(3)] == ["a1", "a2", "a3"]
    assert len(val) == 2 and val[1]["label"].unique().tolist() == [EXPECTED_COCO[1]]


def test_coco_missing_file_named_in_list(tmp_path):
    make_coco(tmp_path, ["a1", "a2"], ["b1"])
    (tmp_path / "cocostuff/annotations/train2017/a2.png").unlink()
    with pytest.raises(SmoosegError, match=r"missing, e\.g\. .*a2\.png.*expected layout"):
        build_dataset("cocostuff27", tmp_path, "train", res=8)
    (tmp_path / "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("\n")
    with pytest.raises(SmoosegError, match="is empty"):
        build_dataset("cocostuff27", tmp_path, "val", res=8)


# ---------------------------------------------------------------- cityscapes

def test_cityscapes_reader_on_official_layout(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=4, n_val=2, size=(32, 64))
    ds = build_dataset("cityscapes", tmp_path, "train", res=None, crop="none")
    assert len(ds) == 4 and ds.class_names == list(CITYSCAPES_CLASSES)
    for i in range(len(ds)):
        name = ds.item_name(i)
        raw = np.asarray(Image.open(next(
            (tmp_path / "cityscapes/gtFine/train").glob(f"*/{name}_gtFine_labelIds.png"))))
        _, label = ds.load_raw(i)
        expected = np.where(raw >= 7, raw.astype(np.int64) - 7, -1)
        assert np.array_equal(label, expected)
        assert (label == -1).any() and label.max() < 27
    item = build_dataset("cityscapes", tmp_path, "val", res=16)[0]
    assert item["img"].shape == (3, 16, 16) and item["label"].shape == (16, 16)


def test_cityscapes_every_label_id(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=1, n_val=1, size=(16, 16))
    label_path = next((tmp_path / "cityscapes/gtFine/train").glob("*/*_labelIds.png"))
    save_png(np.arange(256, dtype=np.uint8).reshape(16, 16), label_path)
    _, label = build_dataset("cityscapes", tmp_path, "train", res=None).load_raw(0)
    flat = label.reshape(-1)
    for label_id in range(256):
        expected = label_id - 7 if 7 <= label_id <= 33 else -1
        assert flat[label_id] == expected, label_id


def test_cityscapes_count_mismatch_and_missing_folder(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=3, n_val=1, size=(16, 32))
    label = sorted((tmp_path / "cityscapes/gtFine/train").glob("*/*_labelIds.png"))[1]
    label.unlink()
    with pytest.raises(SmoosegError, match="3 images but 2 label maps"):
        build_dataset("cityscapes", tmp_path, "train", res=8)
    with pytest.raises(SmoosegError, match=r"gtFine/test not found.*leftImg8bit"):
        (tmp_path / "cityscapes/leftImg8bit/test").mkdir()
        build_dataset("cityscapes", tmp_path, "test", res=8)


def test_corrupt_image_is_named(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=2, n_val=1, size=(16, 32))
    image = sorted((tmp_path / "cityscapes/leftImg8bit/val").glob("*/*.png"))[0]
    image.write_bytes(image.read_bytes()[:60])
    ds = build_dataset("cityscapes", tmp_path, "val", res=8)
    with pytest.raises(SmoosegError, match=f"cannot read image {image}"):
        ds[0]


# ---------------------------------------------------------------- potsdam

def make_potsdam(root, lists, float_images=True):
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    all_ids = []
    for list_name, ids in lists.items():
        (base / f"{list_name}.txt").write_text("".join(f"{i}\n" for i in ids))
        all_ids += ids
    for k, i in enumerate(all_ids):
        img = np.random.default_rng(k).random((8, 8, 4))
        if not float_images:
            img = (img * 255).astype(np.uint8)
        gt = np.r_[np.arange(6), [255, 6, 7, 100], np.arange(54) % 6].astype(np.uint8)
        scipy.io.savemat(base / "imgs" / f"{i}.mat", {"img": img})
        scipy.io.savemat(base / "gt" / f"{i}.mat", {"gt": gt.reshape(8, 8)})
    (base / "all.txt").write_text("".join(f"{i}\n" for i in all_ids))
    return base


def test_potsdam_splits_and_every_id(tmp_path):
    base = make_potsdam(tmp_path, {"labelled_train": ["t0", "t1"], "unlabelled_train": ["u0"],
                                   "labelled_test": ["v0", "v1", "v2"]})
    train = build_dataset("potsdam", tmp_path, "train", res=None, crop="none")
    assert sorted(train.item_name(i) for i in range(len(train))) == ["t0", "t1"]  # the reference's split
    both = build_dataset("potsdam", tmp_path, "train+unlabelled", res=None, crop="none")
    assert sorted(both.item_name(i) for i in range(len(both))) == ["t0", "t1", "u0"]
    val = build_dataset("potsdam", tmp_path, "val", res=None)
    assert [val.item_name(i) for i in range(3)] == ["v0", "v1", "v2"]
    assert len(build_dataset("potsdam", tmp_path, "all", res=None)) == 6
    assert CLASS_NAMES["potsdam"][0] == "roads and cars" and N_CLASSES["potsdam"] == 3
    image, label = val.load_raw(0)
    flat = label.reshape(-1)
    assert flat[:6].tolist() == [0, 1, 2, 2, 0, 1]       # ids 0..5
    assert flat[6:10].tolist() == [-1, -1, -1, -1]        # 255 void, 6/7/100 unknown -> ignore
    source = scipy.io.loadmat(base / "imgs/v0.mat")["img"][..., :3]
    assert np.array_equal(np.asarray(image), (source * 255).astype(np.uint8))


def test_potsdam_uint8_images_and_bad_mat(tmp_path):
    base = make_potsdam(tmp_path, {"labelled_train": ["a"], "unlabelled_train": ["b"],
                                   "labelled_test": ["c"]}, float_images=False)
    image, _ = build_dataset("potsdam", tmp_path, "val", res=None).load_raw(0)
    assert np.array_equal(np.asarray(image), scipy.io.loadmat(base / "imgs/c.mat")["img"][..., :3])
    scipy.io.savemat(base / "gt/c.mat", {"labels": np.zeros((8, 8))})
    with pytest.raises(SmoosegError, match=r"c\.mat has no 'gt'"):
        build_dataset("potsdam", tmp_path, "val", res=None).load_raw(0)
    (base / "imgs/c.mat").write_bytes(b"not a mat file")
    with pytest.raises(SmoosegError, match=r"cannot read .*c\.mat"):
        build_dataset("potsdam", tmp_path, "val", res=None).load_raw(0)
    (base / "imgs/a.mat").unlink()
    with pytest.raises(SmoosegError, match=r"labelled_train\.txt names 1 file.*a\.mat"):
        build_dataset("potsdam", tmp_path, "train", res=None)


# ---------------------------------------------------------------- directory

def test_directory_with_labels(tmp_path):
    write_directory_layout(tmp_path, name="mine", n_train=3, n_val=2, size=(24, 32))
    ds = build_dataset("directory", tmp_path, "train", res=16, n_classes=6, dir_name="mine")
    assert len(ds) == 3 and ds.class_names == [f"class_{i}" for i in range(6)]
    raw = np.asarray(Image.open(tmp_path / "mine/labels/train/scene_0000.png")).astype(np.int64)
    _, label = ds.load_raw(0)
    assert np.array_equal(label, np.where(raw == 255, -1, raw))
    item = ds[2]
    assert item["name"] == "scene_0002" and item["label"].shape == (16, 16)
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    batch = next(iter(loader))
    assert batch["img"].shape == (3, 3, 16, 16) and batch["label"].dtype == torch.long


def test_directory_without_labels_and_root_as_data_dir(tmp_path):
    write_directory_layout(tmp_path, name="bare", n_train=2, n_val=1, with_labels=False)
    ds = build_dataset("directory", tmp_path / "bare", "val", res=16, n_classes=4)
    item = ds[0]
    assert torch.equal(item["label"], torch.full((16, 16), -1, dtype=torch.long))
    assert ds.load_raw(0)[1] is None


def test_directory_errors(tmp_path):
    write_directory_layout(tmp_path, name="mine", n_train=3, n_val=1, size=(16, 16))
    with pytest.raises(SmoosegError, match="needs n_classes"):
        build_dataset("directory", tmp_path, "train", res=8, dir_name="mine")
    ds = build_dataset("directory", tmp_path, "train", res=8, n_classes=4, dir_name="mine")
    with pytest.raises(SmoosegError, match=r"scene_000\d\.png holds class id [45] but n_classes=4"):
        for i in range(len(ds)):
            ds.load_raw(i)
    (tmp_path / "mine/labels/train/scene_0001.png").unlink()
    with pytest.raises(SmoosegError, match="3 images .* but 2 labels"):
        build_dataset("directory", tmp_path, "train", res=8, n_classes=6, dir_name="mine")
    with pytest.raises(SmoosegError, match=r"imgs/test not found.*expected layout"):
        build_dataset("directory", tmp_path, "test", res=8, n_classes=6, dir_name="mine")
    (tmp_path / "mine/imgs/empty").mkdir()
    with pytest.raises(SmoosegError, match="no images"):
        build_dataset("directory", tmp_path, "empty", res=8, n_classes=6, dir_name="mine")
    save_png(np.zeros((5, 5), np.uint8), tmp_path / "mine/labels/val/scene_0000.png")
    with pytest.raises(SmoosegError, match="is 5x5 but image"):
        build_dataset("directory", tmp_path, "val", res=8, n_classes=6, dir_name="mine")[0]


# ---------------------------------------------------------------- cropped sets

def test_cropped_reader_subtracts_one(tmp_path):
    folder = tmp_path / "cropped/cityscapes_five_crop_0.5"
    stored = np.arange(25, dtype=np.uint8).reshape(5, 5) % 28      # 0 = ignore, 1..27 classes
    for n in range(5):
        save_png(rgb(5, 5, n), folder / "img/train" / f"{n}.jpg")
        save_png(stored, folder / "label/train" / f"{n}.png")
    ds = build_dataset("cityscapes", tmp_path, "train", res=None,
                       crop_source={"crop_type": "five", "ratio": 0.5})
    assert len(ds) == 5 and ds.n_classes == 27 and ds.item_name(3) == "3"
    assert np.array_equal(ds.load_raw(0)[1], stored.astype(np.int64) - 1)
    (folder / "label/train/2.png").unlink()
    (folder / "img/train/.2.png.x1.tmp").write_bytes(b"partial")
    with pytest.raises(SmoosegError, match=r"incomplete \(crop 2 missing\); re-run crop_datasets"):
        build_dataset("cityscapes", tmp_path, "train", res=None,
                      crop_source={"crop_type": "five", "ratio": 0.5})
    with pytest.raises(SmoosegError, match="run crop_datasets.py"):
        build_dataset("cityscapes", tmp_path, "train", res=None,
                      crop_source={"crop_type": "random", "ratio": 0.5})


# ---------------------------------------------------------------- common

def test_unknown_name_and_missing_data_dir(tmp_path):
    with pytest.raises(SmoosegError, match="unknown data set 'voc'.*cityscapes"):
        build_dataset("voc", tmp_path, "train", res=8)
    with pytest.raises(SmoosegError, match=r"data_dir .*nowhere does not exist.*leftImg8bit"):
        build_dataset("cityscapes", tmp_path / "nowhere", "train", res=8)
    with pytest.raises(SmoosegError, match=r"cityscapes not found.*expected layout"):
        build_dataset("cityscapes", tmp_path, "train", res=8)


def test_random_crops_reproducible_and_change_with_epoch(tmp_path):
    write_cityscapes_layout(tmp_path, n_train=2, n_val=1, size=(32, 64))
    a, b = (build_dataset("cityscapes", tmp_path, "train", res=16, crop="random", seed=3)
            for _ in range(2))
    state = torch.get_rng_state()
    first = a[1]
    assert torch.equal(first["img"], b[1]["img"]) and torch.equal(first["label"], b[1]["label"])
    assert torch.equal(state, torch.get_rng_state())
    crops = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        crops.add(a[1]["img"].sum().item())
    assert len(crops) > 2
