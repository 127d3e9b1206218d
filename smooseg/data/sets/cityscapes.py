"""Cityscapes with 27 classes (labelIds 7..33; smaller ids and 255 are void).

Layout, relative to ``data_dir``::

    cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
"""

from smooseg.data.reader import SegmentationDataset, missing_error
from smooseg.data.spec import DatasetSpec, lookup_table
from smooseg.errors import SmoosegError

FIRST_ID = 7  # labelIds 7..33 are the 27 classes, in this order
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"

# The official colours of labelIds 7..33, except polegroup: officially pole's (153, 153, 153),
# here a darker grey so that every class has a colour of its own.
CLASSES = (
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("guard rail", (180, 165, 180)), ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)), ("pole", (153, 153, 153)), ("polegroup", (120, 120, 120)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)), ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)), ("car", (0, 0, 142)), ("truck", (0, 0, 70)), ("bus", (0, 60, 100)),
    ("caravan", (0, 0, 90)), ("trailer", (0, 0, 110)), ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
)


class CityscapesReader(SegmentationDataset):
    """Official Cityscapes fine annotations, paired by file name."""

    exif = False  # the official annotations are drawn on the stored pixels

    @classmethod
    def list_items(cls, spec, root, split):
        image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (root, image_root, label_root):
            if not folder.is_dir():
                raise missing_error(spec.name, spec.layout, "folder", folder)
        images = sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}"))
        labels = sorted(label_root.glob(f"*/*{LABEL_SUFFIX}"))
        if not images:
            raise SmoosegError(f"{spec.name}: no *{IMAGE_SUFFIX} images under {image_root}; "
                               f"expected layout: {spec.layout}")
        entries = []
        for image in images:
            stem = image.name[: -len(IMAGE_SUFFIX)]
            label = label_root / image.parent.name / f"{stem}{LABEL_SUFFIX}"
            if not label.is_file():
                raise SmoosegError(
                    f"{spec.name}: {len(images)} images but {len(labels)} label maps in "
                    f"{label_root}; missing {label}; expected layout: {spec.layout}")
            entries.append((stem, image, label))
        if len(labels) != len(images):
            raise SmoosegError(
                f"{spec.name}: {len(images)} images in {image_root} but {len(labels)} label maps "
                f"in {label_root}; remove the extra label maps or restore the images")
        return entries

    def label_rule(self):
        return ("a Cityscapes label is the single-channel *_gtFine_labelIds.png of its image, the "
                "same size")


DATASET_SPEC = DatasetSpec(
    name="cityscapes",
    reader=CityscapesReader,
    layout=f"<data_dir>/cityscapes/leftImg8bit/<split>/<city>/<name>{IMAGE_SUFFIX} and "
           f"<data_dir>/cityscapes/gtFine/<split>/<city>/<name>{LABEL_SUFFIX}",
    folder="cityscapes",
    classes=CLASSES,
    label_table=lookup_table({FIRST_ID + i: i for i in range(len(CLASSES))}),
    splits={"train": ("train",), "val": ("val",), "test": ("test",)},
    archives=("cityscapes",),
)
