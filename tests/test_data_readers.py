"""Readers on synthetic instances of each real on-disk layout (docs/method.md §7)."""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from smooseg.data.datasets import build_dataset
from smooseg.data.registry import dataset_spec
from smooseg.data.sets.cocostuff27 import COCO_FINE
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout
from smooseg.errors import SmoosegError
from smooseg.io import write_json

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
    assert len(ds) == 4 and ds.class_names == list(dataset_spec("cityscapes").class_names)
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
    potsdam = dataset_spec("potsdam")
    assert potsdam.class_names[0] == "roads and cars" and potsdam.n_classes == 3
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
    with pytest.raises(SmoosegError, match=r"dataset.n_clusters is not set; a directory data set without "
                                           r"labels needs the number of clusters to find, e.g. "
                                           r"dataset.n_clusters=5 "
                                           r"\(with labels: dataset.n_classes="):
        build_dataset("directory", tmp_path, "train", res=8, dir_name="mine")
    with pytest.raises(SmoosegError, match="dataset.n_classes=4 and dataset.n_clusters=6 disagree; set one"):
        build_dataset("directory", tmp_path, "train", res=8, dir_name="mine", n_classes=4, n_clusters=6)
    with pytest.raises(SmoosegError, match=r"dataset.n_classes=2.5 is not a whole number"):
        build_dataset("directory", tmp_path, "train", res=8, dir_name="mine", n_classes=2.5)
    with pytest.raises(SmoosegError, match=r"scene_000\d\.png holds class id [45] but n_classes=4; "
                                           r"a label is a single-channel PNG .* ids 0\.\.3"):
        build_dataset("directory", tmp_path, "train", res=8, n_classes=4, dir_name="mine")  # at build
    (tmp_path / "mine/labels/train/scene_0001.png").unlink()
    with pytest.raises(SmoosegError, match=r"3 images .* and 2 labels .* do not pair up: 1 image\(s\) "
                                           r"have no label \(scene_0001\.png\)"):
        build_dataset("directory", tmp_path, "train", res=8, n_classes=6, dir_name="mine")
    with pytest.raises(SmoosegError, match=r"imgs/test not found.*expected layout"):
        build_dataset("directory", tmp_path, "test", res=8, n_classes=6, dir_name="mine")
    (tmp_path / "mine/imgs/empty").mkdir()
    with pytest.raises(SmoosegError, match="no images"):
        build_dataset("directory", tmp_path, "empty", res=8, n_classes=6, dir_name="mine")
    save_png(np.zeros((5, 5), np.uint8), tmp_path / "mine/labels/val/scene_0000.png")
    with pytest.raises(SmoosegError, match="is 5x5 but image .* is 16x16 .*the size of its image"):
        build_dataset("directory", tmp_path, "val", res=8, n_classes=6, dir_name="mine")


def directory_images(root, names, size=(12, 16)):
    for k, name in enumerate(names):
        save_png(rgb(*size, k), root / "imgs/train" / name)


def test_directory_labels_pair_by_stem_not_by_sorted_order(tmp_path):
    root = tmp_path / "own"
    directory_images(root, ["a.jpg", "a0.png", "b.png"])
    # sorted, the labels run a0, a_gt, b: pairing by position would give image a the label of a0
    for value, name in ((1, "a_gt.png"), (2, "a0.png"), (3, "b.png")):
        save_png(np.full((12, 16), value, np.uint8), root / "labels/train" / name)
    ds = build_dataset("directory", root, "train", res=None, n_classes=4)
    assert [ds.item_name(i) for i in range(3)] == ["a", "a0", "b"]
    assert [int(ds.load_raw(i)[1][0, 0]) for i in range(3)] == [1, 2, 3]


def test_directory_unmatched_and_ambiguous_files_are_named(tmp_path):
    root = tmp_path / "own"
    directory_images(root, ["a.png", "b.png", "c.png"])
    labels = root / "labels/train"
    for name in ("a.png", "b_gt.png", "zebra.png", "c.jpg"):
        save_png(np.zeros((12, 16), np.uint8), labels / name)
    with pytest.raises(SmoosegError) as err:
        build_dataset("directory", root, "train", res=None, n_classes=2)
    message = str(err.value)
    assert "3 images" in message and "4 labels" in message and "do not pair up" in message
    assert "2 label(s) match no image (c.jpg, zebra.png)" in message   # a JPEG label is not read
    assert "1 image(s) have no label (c.png)" in message
    assert "<stem>.png or <stem>_gt.png" in message and "\n" not in message
    (labels / "c.jpg").unlink()
    (labels / "zebra.png").unlink()
    save_png(np.zeros((12, 16), np.uint8), labels / "c.png")
    save_png(np.zeros((12, 16), np.uint8), labels / "c_gt.png")
    with pytest.raises(SmoosegError, match="labels c.png and c_gt.png .* both belong to image c.png"):
        build_dataset("directory", root, "train", res=None, n_classes=2)
    (labels / "c_gt.png").unlink()
    assert len(build_dataset("directory", root, "train", res=None, n_classes=2)) == 3
    save_png(rgb(12, 16), root / "imgs/train/c.jpg")
    with pytest.raises(SmoosegError, match="images c.jpg and c.png .* share the stem 'c'"):
        build_dataset("directory", root, "train", res=None, n_classes=2)


def test_bad_label_files_stop_the_build_not_the_batch(tmp_path):
    write_directory_layout(tmp_path, name="mine", n_train=3, n_val=1, size=(16, 16))
    label = tmp_path / "mine/labels/train/scene_0002.png"
    save_png(rgb(16, 16), label)                                       # a colour picture
    with pytest.raises(SmoosegError, match=r"label .*scene_0002\.png has mode RGB, not a single-channel "
                                           r"id map; a label is a single-channel PNG"):
        build_dataset("directory", tmp_path, "train", res=8, n_classes=6, dir_name="mine")
    label.write_bytes(b"\x89PNG but cut")
    with pytest.raises(SmoosegError, match=r"cannot read label .*scene_0002\.png"):
        build_dataset("directory", tmp_path, "train", res=8, n_classes=6, dir_name="mine")
    # the official layouts: checked from the headers (mode and size) when the set is built
    write_cityscapes_layout(tmp_path / "cs", n_train=2, n_val=1, size=(16, 32))
    label = sorted((tmp_path / "cs/cityscapes/gtFine/train").glob("*/*_labelIds.png"))[1]
    save_png(np.zeros((16, 30), np.uint8), label)
    with pytest.raises(SmoosegError, match=f"label {label} is 16x30 but image .* is 16x32; a Cityscapes "
                                           "label is the single-channel"):
        build_dataset("cityscapes", tmp_path / "cs", "train", res=8)
    save_png(rgb(16, 32), label)
    with pytest.raises(SmoosegError, match="has mode RGB"):
        build_dataset("cityscapes", tmp_path / "cs", "train", res=8)


def test_potsdam_labels_checked_from_mat_headers(tmp_path):
    base = make_potsdam(tmp_path, {"labelled_train": ["a"], "unlabelled_train": ["b"],
                                   "labelled_test": ["c"]})
    scipy.io.savemat(base / "gt/c.mat", {"gt": np.zeros((8, 7), np.uint8)})
    with pytest.raises(SmoosegError, match=r"label .*c\.mat is 8x7 but image .*c\.mat is 8x8"):
        build_dataset("potsdam", tmp_path, "val", res=None)


def save_exif(array, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_as_segmentation_applies_it(tmp_path, suffix):
    from smooseg.eval.segment import read_image

    root = tmp_path / "own"
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = 250                                   # left half bright, as stored
    save_exif(stored, root / "imgs/train" / f"photo{suffix}", orientation=6)   # rotate 90 CW
    save_png(np.zeros((20, 10), np.uint8), root / "labels/train/photo.png")   # drawn as displayed
    ds = build_dataset("directory", root, "train", res=None, n_classes=2)
    image, label = ds.load_raw(0)
    assert image.size == (10, 20) and label.shape == (20, 10)
    assert np.array_equal(np.asarray(image), read_image(root / "imgs/train" / f"photo{suffix}"))
    assert np.asarray(image)[:10].mean() > 200 > np.asarray(image)[10:].mean()  # top half bright
    save_png(np.zeros((10, 20), np.uint8), root / "labels/train/photo.png")   # the stored size
    with pytest.raises(SmoosegError, match=r"is 10x20 but image .* is 20x10 \(after its EXIF orientation\)"):
        build_dataset("directory", root, "train", res=None, n_classes=2)


@pytest.mark.parametrize("dtype,mode,value,expected", [
    (np.uint16, "I;16", 65535, 255), (np.uint16, "I;16", 32896, 128), (np.int32, "I", 65535, 255),
    (np.float32, "F", 0.5, 127), (np.float32, "F", 200.0, 200),
])
def test_high_bit_depth_images_read_as_8_bit(tmp_path, dtype, mode, value, expected):
    root = tmp_path / "own"
    array = np.zeros((8, 8), dtype)
    array[:, 4:] = value
    path = root / "imgs/train" / ("deep.png" if dtype == np.uint16 else "deep.tif")
    path.parent.mkdir(parents=True)
    Image.fromarray(array).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
    image, _ = build_dataset("directory", root, "train", res=None, n_classes=2).load_raw(0)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels[:, :4] == 0).all() and (pixels[:, 4:] == expected).all()


# ---------------------------------------------------------------- cropped sets

def test_cropped_reader_subtracts_one(tmp_path):
    folder = tmp_path / "cropped/cityscapes_five_crop_0.5"
    stored = np.arange(25, dtype=np.uint8).reshape(5, 5) % 28      # 0 = ignore, 1..27 classes
    for n in range(5):
        save_png(rgb(5, 5, n), folder / "img/train" / f"aachen_1_{n}.jpg")
        save_png(stored, folder / "label/train" / f"aachen_1_{n}.png")
    source = {"crop_type": "five", "ratio": 0.5}
    command = (f"`python crop_datasets.py data_dir={tmp_path} datasets=[cityscapes] crop_types=[five] "
               "crop_ratio=0.5`")
    with pytest.raises(SmoosegError) as err:                         # no completion record
        build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=source)
    assert f"cropped training set {folder} is incomplete: it has no completion record" in str(err.value)
    assert command in str(err.value) and "dataset.train_crop_source=null" in str(err.value)
    write_json({"format": 2, "crop_type": "five", "ratio": 0.5, "seed": 0, "jpeg_quality": 75,
                "splits": {"train": {"source_images": 1, "crops": 5, "items": {"aachen_1": [10, 20]}}}},
               folder / "complete.json")
    ds = build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=source)
    assert len(ds) == 5 and ds.n_classes == 27 and ds.item_name(3) == "aachen_1_3"
    assert np.array_equal(ds.load_raw(0)[1], stored.astype(np.int64) - 1)
    (folder / "label/train/aachen_1_2.png").unlink()
    (folder / "img/train/.aachen_1_2.png.x1.tmp").write_bytes(b"partial")
    with pytest.raises(SmoosegError, match=r"does not match its completion record: img/train holds 5 "
                                           r"crops and label/train 4 but complete.json lists 5; finish it"):
        build_dataset("cityscapes", tmp_path, "train", res=None, crop_source=source)
    with pytest.raises(SmoosegError, match=r"cityscapes_random_crop_0.5 does not exist; write it with "
                                           r"`python crop_datasets.py .*crop_types=\[random\]"):
        build_dataset("cityscapes", tmp_path, "train", res=None,
                      crop_source={"crop_type": "random", "ratio": 0.5})
    with pytest.raises(SmoosegError, match=r"dataset.train_crop_source.crop_type=fivee is unknown; use one "
                                           r"of five, random \(the crop types crop_datasets.py writes\)"):
        build_dataset("cityscapes", tmp_path, "train", res=None,
                      crop_source={"crop_type": "fivee", "ratio": 0.5})


def test_cropped_set_of_an_earlier_version_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "cropped/cityscapes_five_crop_0.5"
    save_png(rgb(5, 5), folder / "img/train/0.jpg")
    save_png(np.zeros((5, 5), np.uint8), folder / "label/train/0.png")
    write_json({"format": 1, "crop_type": "five", "ratio": 0.5, "seed": 0, "jpeg_quality": 75,
                "splits": {"train": {"source_images": 1, "crops": 5}}}, folder / "complete.json")
    with pytest.raises(SmoosegError, match=r"was written by an earlier version .*; delete it; then write it "
                                           r"with `python crop_datasets.py"):
        build_dataset("cityscapes", tmp_path, "train", res=None,
                      crop_source={"crop_type": "five", "ratio": 0.5})


def test_split_list_with_a_byte_order_mark(tmp_path):
    make_coco(tmp_path, ["a1", "a2"], ["b1"])
    listing = tmp_path / "cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt"
    listing.write_text("a1\r\na2\r\n", encoding="utf-8-sig")          # as Windows Notepad saves it
    assert listing.read_bytes().startswith(b"\xef\xbb\xbf")
    ds = build_dataset("cocostuff27", tmp_path, "train", res=None)
    assert [ds.item_name(i) for i in range(2)] == ["a1", "a2"]


def test_image_over_the_pixel_limit_says_so_and_how_to_allow_it(tmp_path, monkeypatch):
    write_cityscapes_layout(tmp_path, n_train=1, n_val=1, size=(32, 48))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 48 // 4)       # the 32x48 label is > 2x the limit
    with pytest.raises(SmoosegError, match=r"too large for Pillow's safety limit of 384 pixels .*allow it "
                                           r"with SMOOSEG_MAX_IMAGE_PIXELS=<pixels> \(or none\)"):
        build_dataset("cityscapes", tmp_path, "train", res=None)
    from smooseg.io import apply_pixel_limit

    apply_pixel_limit({"SMOOSEG_MAX_IMAGE_PIXELS": "none"})
    assert Image.MAX_IMAGE_PIXELS is None
    assert len(build_dataset("cityscapes", tmp_path, "train", res=None)) == 1


def test_unlabelled_directory_needs_no_val_folder(tmp_path):
    write_directory_layout(tmp_path, name="photos", n_train=3, n_val=0, size=(16, 16), with_labels=False)
    assert not (tmp_path / "photos/imgs/val").exists()
    val = build_dataset("directory", tmp_path, "val", res=8, n_clusters=4, dir_name="photos")
    assert len(val) == 3 and not val.labelled and val.n_classes == 4
    assert val.class_names == ["class_0", "class_1", "class_2", "class_3"]
    write_directory_layout(tmp_path, name="labelled", n_train=3, n_val=0, size=(16, 16))
    with pytest.raises(SmoosegError, match=r"image folder .*labelled/imgs/val not found; .*with labels the "
                                           r"validation images and labels go in imgs/val and labels/val"):
        build_dataset("directory", tmp_path, "val", res=8, n_classes=6, dir_name="labelled")
    assert build_dataset("directory", tmp_path, "train", res=8, n_classes=6, dir_name="labelled").labelled


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
