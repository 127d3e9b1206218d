"""Potsdam-3: ISPRS Potsdam tiles as ``.mat`` files, six ids merged into three classes.

Layout, relative to ``data_dir``::

    potsdam/imgs/<id>.mat  (key img)    potsdam/gt/<id>.mat  (key gt)
    potsdam/{labelled_train,unlabelled_train,labelled_test,all}.txt

``train`` is ``labelled_train`` as in the reference, ``train+unlabelled`` adds
``unlabelled_train`` (``dataset.train_unlabelled=true``), ``val`` is ``labelled_test``.
"""

from PIL import Image

from smooseg.data.labels import mat_rgb, mat_shape, read_mat
from smooseg.data.reader import SegmentationDataset, check_exist, missing_error, read_list
from smooseg.data.spec import DatasetSpec, lookup_table, map_ids
from smooseg.errors import SmoosegError

CLASSES = (("roads and cars", (255, 255, 255)), ("buildings and clutter", (0, 0, 255)),
           ("trees and vegetation", (0, 255, 0)))
# The six ISPRS ids: 0 road + 4 car, 1 building + 5 clutter, 2 low vegetation + 3 tree.
FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


class PotsdamReader(SegmentationDataset):
    """``.mat`` tiles named by the split lists."""

    exif = False

    @classmethod
    def list_items(cls, spec, root, split):
        if not root.is_dir():
            raise missing_error(spec.name, spec.layout, "folder", root)
        entries = []
        for list_name in spec.native_splits(split):
            list_path = root / f"{list_name}.txt"
            ids = read_list(spec, list_path)
            images = [root / "imgs" / f"{i}.mat" for i in ids]
            labels = [root / "gt" / f"{i}.mat" for i in ids]
            check_exist(spec, list_path, images + labels)
            entries.extend(zip(ids, images, labels, strict=True))
        return entries

    def label_rule(self):
        return "a Potsdam label is gt/<id>.mat holding an H x W id array 'gt', the size of its 'img'"

    def check_pair_header(self, image_path, label_path):
        image_shape = mat_shape(image_path, "img")
        label_shape = mat_shape(label_path, "gt")
        if len(image_shape) != 3 or image_shape[2] < 3:
            raise SmoosegError(f"{image_path}: 'img' has shape {image_shape}; expected H x W x >=3 (RGB)")
        if len(label_shape) == 3 and label_shape[2] == 1:
            label_shape = label_shape[:2]
        if len(label_shape) != 2:
            raise SmoosegError(f"{label_path}: 'gt' has shape {label_shape}; expected an H x W id map")
        self.check_size(image_path, label_path, (image_shape[1], image_shape[0]), label_shape)

    def read_image(self, path):
        return Image.fromarray(mat_rgb(read_mat(path, "img"), path))

    def read_label(self, path):
        gt = read_mat(path, "gt")
        if gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[..., 0]
        if gt.ndim != 2:
            raise SmoosegError(f"{path}: 'gt' has shape {gt.shape}; expected an H x W id map")
        return map_ids(gt, self.spec.label_table)


DATASET_SPEC = DatasetSpec(
    name="potsdam",
    reader=PotsdamReader,
    layout="<data_dir>/potsdam/imgs/<id>.mat (key img), <data_dir>/potsdam/gt/<id>.mat "
           "(key gt) and the lists "
           "<data_dir>/potsdam/{labelled_train,unlabelled_train,labelled_test,all}.txt",
    folder="potsdam",
    classes=CLASSES,
    label_table=lookup_table(FINE_TO_COARSE),
    splits={
        "train": ("labelled_train",),
        "train+unlabelled": ("unlabelled_train", "labelled_train"),
        "val": ("labelled_test",),
        "train+val": ("unlabelled_train", "labelled_train", "labelled_test"),
        "labelled_train": ("labelled_train",),
        "unlabelled_train": ("unlabelled_train",),
        "labelled_test": ("labelled_test",),
        "all": ("all",),
    },
    eval_res=224,
    archives=("potsdam", "potsdamraw"),
    aliases=("potsdamraw",),
    train_unlabelled_split="train+unlabelled",
)
