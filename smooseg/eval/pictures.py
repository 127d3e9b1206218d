"""Pictures a person can read: an image beside its segmentation, with a legend of the colours it
actually holds, and the raw cluster ids as a viewable palette PNG.

The side-by-side (``<stem>_side.png``) has the panels image | overlay | colour mask, then the
ground truth when there is one, each titled, and the legend to their right: one row per colour
present in the picture, named by its class when a cluster -> class matching exists, else
``cluster n``.

The ids file (``<stem>_ids.png``): up to 256 clusters an 8-bit palette PNG (mode ``P``) whose
pixel values are the cluster ids and whose palette holds the mask colours, so a viewer shows
the colour mask and ``np.array(Image.open(path))`` gives the ids; beyond 256 clusters a 16-bit
greyscale PNG (mode ``I;16``) whose values are the ids.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from smooseg.io import atomic_write
from smooseg.viz import legend_image, overlay

TITLE_SIZE = 14
PANEL_GAP = 4
# Panels of TensorBoard example rows are enlarged (nearest neighbour) to at least this height.
EXAMPLE_MIN_SIDE = 192


def cluster_names(n_clusters, class_map=None, class_names=None):
    """The legend name of each cluster: its class (``road (cluster 3)``) when ``class_map`` matches
    it to one, ``cluster n (unmatched)`` when the map leaves it out, ``cluster n`` without a map."""
    if class_map is None:
        return [f"cluster {k}" for k in range(n_clusters)]
    class_map = np.asarray(class_map, dtype=np.int64)
    return [f"{class_names[c]} (cluster {k})" if c >= 0 else f"cluster {k} (unmatched)"
            for k, c in enumerate(class_map.tolist())]


def present_legend(ids, colors, names):
    """Legend (H×W×3 uint8) of only the clusters that occur in ``ids``, in cluster order."""
    present = np.unique(np.asarray(ids))
    present = present[(present >= 0) & (present < len(names))]
    return legend_image([names[k] for k in present], [colors[k] for k in present])


def _titled(panel, title, font):
    height, width = panel.shape[:2]
    canvas = Image.new("RGB", (width, height + TITLE_SIZE + 6), "white")
    canvas.paste(Image.fromarray(np.asarray(panel, dtype=np.uint8)), (0, TITLE_SIZE + 6))
    ImageDraw.Draw(canvas).text((width // 2, 2), title, fill=(0, 0, 0), font=font, anchor="mt")
    return canvas


def side_by_side(image, mask, legend, alpha=0.5, truth=None):
    """H'×W'×3 uint8: image | overlay | colour mask (| ``truth``, a coloured ground truth), titled,
    then ``legend`` (an H×W×3 uint8 picture) to the right, on white."""
    font = ImageFont.load_default(size=TITLE_SIZE)
    panels = [(image, "image"), (overlay(image, mask, alpha), "overlay"), (mask, "segmentation")]
    if truth is not None:
        panels.append((truth, "ground truth"))
    tiles = [_titled(p, t, font) for p, t in panels] + [Image.fromarray(np.asarray(legend, np.uint8))]
    width = sum(t.width for t in tiles) + PANEL_GAP * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    left = 0
    for tile in tiles:
        canvas.paste(tile, (left, 0))
        left += tile.width + PANEL_GAP
    return np.asarray(canvas)


def save_ids_png(ids, colors, path):
    """Write the H×W cluster ids at ``path`` as described in the module docstring; returns the path."""
    ids = np.asarray(ids)
    if len(colors) <= 256:
        picture = Image.fromarray(ids.astype(np.uint8), mode="P")
        palette = np.zeros((256, 3), np.uint8)
        palette[:len(colors)] = colors
        picture.putpalette(palette.flatten().tolist())
    else:
        picture = Image.fromarray(ids.astype(np.uint16))
    with atomic_write(path, durable=False) as tmp:  # one of many: not flushed one by one
        picture.save(tmp, format="PNG")
    return path


def titled_row(panels, titles, min_side=EXAMPLE_MIN_SIDE):
    """H'×W'×3 uint8: equally sized H×W×3 ``panels`` side by side, each enlarged by a whole factor
    (nearest neighbour) to at least ``min_side`` pixels high and titled above."""
    font = ImageFont.load_default(size=TITLE_SIZE)
    factor = max(1, -(-min_side // panels[0].shape[0]))
    tiles = [_titled(np.asarray(p, np.uint8).repeat(factor, 0).repeat(factor, 1), t, font)
             for p, t in zip(panels, titles, strict=True)]
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + PANEL_GAP * (len(tiles) - 1), tiles[0].height),
                       "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * (tile.width + PANEL_GAP), 0))
    return np.asarray(canvas)
