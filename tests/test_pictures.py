"""Readable pictures: the side-by-side, a legend of only the colours present, the palette ids PNG."""

import numpy as np
import torch
from PIL import Image

from smooseg.data.datasets import DatasetInfo
from smooseg.eval.pictures import cluster_names, present_legend, save_ids_png, side_by_side, titled_row
from smooseg.eval.results import write_outputs
from smooseg.viz import colormap


def _colours(picture):
    return {tuple(c) for c in np.asarray(picture).reshape(-1, 3)}


def test_cluster_names_with_and_without_a_matching():
    assert cluster_names(3) == ["cluster 0", "cluster 1", "cluster 2"]
    assert cluster_names(3, [1, -1, 0], ["road", "tree"]) == [
        "tree (cluster 0)", "cluster 1 (unmatched)", "road (cluster 2)"]


def test_legend_holds_only_the_colours_present():
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
    ids = np.array([[0, 0], [2, 2]])
    legend = present_legend(ids, colours, cluster_names(4))
    found = _colours(legend)
    assert (255, 0, 0) in found and (0, 0, 255) in found
    assert (0, 255, 0) not in found and (255, 255, 0) not in found
    two_rows = present_legend(np.array([[0, 1], [2, 3]]), colours, cluster_names(4))
    assert two_rows.shape[0] > legend.shape[0]            # one row per present colour


def test_side_by_side_panels_in_order():
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30, 3), np.uint8)
    mask[..., 0] = 255
    truth = np.zeros((20, 30, 3), np.uint8)
    truth[..., 2] = 255
    legend = np.full((10, 15, 3), 255, np.uint8)
    picture = side_by_side(image, mask, legend, alpha=0.5, truth=truth)
    bottom = picture[-1]
    width, gap = 30, 4
    assert tuple(bottom[0]) == (200, 200, 200)                         # image
    assert tuple(bottom[width + gap]) == (228, 100, 100)               # overlay: (200+255)/2, 200/2
    assert tuple(bottom[2 * (width + gap)]) == (255, 0, 0)             # colour mask
    assert tuple(bottom[3 * (width + gap)]) == (0, 0, 255)             # ground truth
    assert picture.shape[1] == 4 * width + 15 + 4 * gap
    assert side_by_side(image, mask, legend).shape[1] == 3 * width + 15 + 3 * gap


def test_ids_png_is_a_viewable_palette_image_of_the_raw_ids(tmp_path):
    colours = colormap("potsdam", 5)
    ids = np.array([[0, 1, 4], [3, 2, 0]])
    save_ids_png(ids, colours, tmp_path / "a_ids.png")
    with Image.open(tmp_path / "a_ids.png") as im:
        assert im.mode == "P"
        assert (np.asarray(im) == ids).all()                            # the raw ids
        assert (np.asarray(im.convert("RGB")) == colours[ids]).all()   # a viewer shows the mask
    many = np.array([[0, 300]])
    save_ids_png(many, colormap("directory", 301), tmp_path / "b_ids.png")
    with Image.open(tmp_path / "b_ids.png") as im:
        assert np.asarray(im).astype(np.int64).tolist() == [[0, 300]]


def test_evaluation_writes_a_side_by_side_per_named_example(tmp_path):
    data = DatasetInfo(n_classes=3, name="potsdam")
    metrics = {"assignment": {name: i for i, name in enumerate(data.class_names)}}
    label = np.zeros((8, 8), np.int64)
    label[:, 4:] = 1
    label[0, 0] = -1
    pred = torch.zeros(8, 8, dtype=torch.long)
    examples = [(np.zeros((8, 8, 3), np.uint8), label, pred, "top_0001.png"),
                (np.zeros((8, 8, 3), np.uint8), label, pred, "sub/top_0001.png")]
    write_outputs(metrics, examples, data, 3, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*_side.png")) == ["1_top_0001_side.png", "top_0001_side.png"]
    palette = colormap("potsdam", 3)
    found = _colours(Image.open(tmp_path / "top_0001_side.png").convert("RGB"))
    assert tuple(palette[0]) in found and tuple(palette[1]) in found
    assert tuple(palette[2]) not in found                               # class 2 occurs nowhere


def test_titled_row_enlarges_small_panels_by_a_whole_factor():
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.full((32, 32, 3), 255, np.uint8)
    b[0, 0] = (9, 9, 9)
    row = titled_row([a, b], ("image", "prediction"), min_side=100)
    assert row.shape == (128 + 20, 2 * 128 + 4, 3)                   # ×4, a title strip of 20 px
    assert (row[20:24, 132:136] == (9, 9, 9)).all()                  # one pixel became 4×4
    assert (row[-1, :128] == 0).all() and (row[:20] < 255).any()     # the panel, and title text
