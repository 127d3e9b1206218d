import numpy as np
from PIL import Image

from smooseg.data.registry import dataset_spec
from smooseg.viz import colorize, colormap, overlay, pascal_colors, save_png


def test_pascal_palette_first_entries():
    # VOC palette: index 1 = (128,0,0), 2 = (0,128,0), 3 = (128,128,0), 4 = (0,0,128)
    assert pascal_colors(4) == [(128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


def test_colormap_sizes_and_uniqueness():
    cmap = colormap("cityscapes", 30)
    assert cmap.shape == (30, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == dataset_spec("cityscapes").colors[0]
    assert len({tuple(c) for c in cmap[27:]}) == 3
    pots = colormap("potsdam", 3)
    assert [tuple(c) for c in pots] == [(255, 255, 255), (0, 0, 255), (0, 255, 0)]
    coco = colormap("cocostuff27", 27)
    assert len({tuple(c) for c in coco}) == 27


def test_colorize_ignore_black_and_values():
    pal = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)
    label = np.array([[0, 1], [-1, 5]])
    out = colorize(label, pal)
    assert out.tolist() == [[[10, 20, 30], [40, 50, 60]], [[0, 0, 0], [0, 0, 0]]]


def test_overlay_and_save(tmp_path):
    img = np.full((2, 2, 3), 100, np.uint8)
    mask = np.full((2, 2, 3), 200, np.uint8)
    assert (overlay(img, mask, 0.5) == 150).all()
    path = save_png(mask, tmp_path / "a" / "m.png")
    assert np.array_equal(np.asarray(Image.open(path)), mask)
