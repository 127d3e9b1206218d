"""COCO-Stuff 164k with 27 coarse classes (the curated lists of the reference; docs/method.md §7).

Layout, relative to ``data_dir``::

    cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt     (train ids, one a line)
    cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt     (val ids)
    cocostuff/images/{train2017,val2017}/<id>.jpg
    cocostuff/annotations/{train2017,val2017}/<id>.png            (fine ids 0-181, 255 void)

The 182 fine ids map to their coarse class (the COCO / COCO-Stuff supercategory).
"""

from smooseg.data.reader import SegmentationDataset, check_exist, missing_error, read_list
from smooseg.data.spec import DatasetSpec, lookup_table, pascal_colors

COCO_COARSE = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)

# COCO-Stuff fine classes in label-PNG order (PNG value = official 1-based id - 1), each with
# its coarse class (the COCO / COCO-Stuff supercategory). Things 0-90, stuff 91-181. The 11
# things marked "removed" were dropped from COCO and never appear in annotations; like the
# reference they still map to their supercategory.
COCO_FINE = (
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"),  # 0-2
    ("motorcycle", "vehicle"), ("airplane", "vehicle"), ("bus", "vehicle"),  # 3-5
    ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),  # 6-8
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"),  # 9-10
    ("street sign", "outdoor"),  # 11 removed
    ("stop sign", "outdoor"), ("parking meter", "outdoor"), ("bench", "outdoor"),  # 12-14
    ("bird", "animal"), ("cat", "animal"), ("dog", "animal"), ("horse", "animal"),  # 15-18
    ("sheep", "animal"), ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"),  # 19-22
    ("zebra", "animal"), ("giraffe", "animal"),  # 23-24
    ("hat", "accessory"),  # 25 removed
    ("backpack", "accessory"), ("umbrella", "accessory"),  # 26-27
    ("shoe", "accessory"), ("eye glasses", "accessory"),  # 28-29 removed
    ("handbag", "accessory"), ("tie", "accessory"), ("suitcase", "accessory"),  # 30-32
    ("frisbee", "sports"), ("skis", "sports"), ("snowboard", "sports"),  # 33-35
    ("sports ball", "sports"), ("kite", "sports"), ("baseball bat", "sports"),  # 36-38
    ("baseball glove", "sports"), ("skateboard", "sports"), ("surfboard", "sports"),  # 39-41
    ("tennis racket", "sports"),  # 42
    ("bottle", "kitchen"),  # 43
    ("plate", "kitchen"),  # 44 removed
    ("wine glass", "kitchen"), ("cup", "kitchen"), ("fork", "kitchen"),  # 45-47
    ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),  # 48-50
    ("banana", "food"), ("apple", "food"), ("sandwich", "food"), ("orange", "food"),  # 51-54
    ("broccoli", "food"), ("carrot", "food"), ("hot dog", "food"), ("pizza", "food"),  # 55-58
    ("donut", "food"), ("cake", "food"),  # 59-60
    ("chair", "furniture"), ("couch", "furniture"), ("potted plant", "furniture"),  # 61-63
    ("bed", "furniture"),  # 64
    ("mirror", "furniture"),  # 65 removed
    ("dining table", "furniture"),  # 66
    ("window", "furniture"), ("desk", "furniture"),  # 67-68 removed
    ("toilet", "furniture"),  # 69
    ("door", "furniture"),  # 70 removed
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"),  # 71-73
    ("remote", "electronic"), ("keyboard", "electronic"), ("cell phone", "electronic"),  # 74-76
    ("microwave", "appliance"), ("oven", "appliance"), ("toaster", "appliance"),  # 77-79
    ("sink", "appliance"), ("refrigerator", "appliance"),  # 80-81
    ("blender", "appliance"),  # 82 removed
    ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"), ("scissors", "indoor"),  # 83-86
    ("teddy bear", "indoor"), ("hair drier", "indoor"), ("toothbrush", "indoor"),  # 87-89
    ("hair brush", "indoor"),  # 90 removed
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"),  # 91-93
    ("bridge", "building"), ("building-other", "building"), ("bush", "plant"),  # 94-96
    ("cabinet", "furniture-stuff"), ("cage", "structural"),  # 97-98
    ("cardboard", "rawmaterial"), ("carpet", "floor"),  # 99-100
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"),  # 101-102
    ("cloth", "textile"), ("clothes", "textile"), ("clouds", "sky"),  # 103-105
    ("counter", "furniture-stuff"), ("cupboard", "furniture-stuff"),  # 106-107
    ("curtain", "textile"), ("desk-stuff", "furniture-stuff"), ("dirt", "ground"),  # 108-110
    ("door-stuff", "furniture-stuff"), ("fence", "structural"),  # 111-112
    ("floor-marble", "floor"), ("floor-other", "floor"), ("floor-stone", "floor"),  # 113-115
    ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"),  # 116-118
    ("fog", "water"), ("food-other", "food-stuff"), ("fruit", "food-stuff"),  # 119-121
    ("furniture-other", "furniture-stuff"), ("grass", "plant"),  # 122-123
    ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),  # 124-126
    ("house", "building"), ("leaves", "plant"), ("light", "furniture-stuff"),  # 127-129
    ("mat", "textile"), ("metal", "rawmaterial"),  # 130-131
    ("mirror-stuff", "furniture-stuff"), ("moss", "plant"),  # 132-133
    ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"),  # 134-136
    ("net", "structural"), ("paper", "rawmaterial"), ("pavement", "ground"),  # 137-139
    ("pillow", "textile"), ("plant-other", "plant"), ("plastic", "rawmaterial"),  # 140-142
    ("platform", "ground"), ("playingfield", "ground"), ("railing", "structural"),  # 143-145
    ("railroad", "ground"), ("river", "water"), ("road", "ground"),  # 146-148
    ("rock", "solid"), ("roof", "building"), ("rug", "textile"),  # 149-151
    ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"),  # 152-154
    ("shelf", "furniture-stuff"), ("sky-other", "sky"), ("skyscraper", "building"),  # 155-157
    ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),  # 158-160
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),  # 161-163
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"),  # 164-166
    ("towel", "textile"), ("tree", "plant"), ("vegetable", "food-stuff"),  # 167-169
    ("wall-brick", "wall"), ("wall-concrete", "wall"), ("wall-other", "wall"),  # 170-172
    ("wall-panel", "wall"), ("wall-stone", "wall"), ("wall-tile", "wall"),  # 173-175
    ("wall-wood", "wall"), ("water-other", "water"), ("waterdrops", "water"),  # 176-178
    ("window-blind", "window"), ("window-other", "window"), ("wood", "solid"),  # 179-181
)


COCO_LISTS = {"train2017": "Coco164kFull_Stuff_Coarse.txt",
              "val2017": "Coco164kFull_Stuff_Coarse_7.txt"}


class CocoStuffReader(SegmentationDataset):
    """COCO-Stuff 164k curated lists, 182 fine ids mapped to 27 coarse classes."""

    exif = False  # COCO-Stuff's annotations are drawn on the stored pixels

    @classmethod
    def list_items(cls, spec, root, split):
        native = spec.native_splits(split)[0]
        if not root.is_dir():
            raise missing_error(spec.name, spec.layout, "folder", root)
        list_path = root / "curated" / native / COCO_LISTS[native]
        ids = read_list(spec, list_path)
        images = [root / "images" / native / f"{i}.jpg" for i in ids]
        labels = [root / "annotations" / native / f"{i}.png" for i in ids]
        check_exist(spec, list_path, images + labels)
        return list(zip(ids, images, labels, strict=True))

    def label_rule(self):
        return ("a COCO-Stuff label is the single-channel annotations/<split>/<id>.png of fine ids "
                "(0-181, 255 = void), the size of its image")


DATASET_SPEC = DatasetSpec(
    name="cocostuff27",
    reader=CocoStuffReader,
    layout="<data_dir>/cocostuff/images/<train2017|val2017>/<id>.jpg, "
           "<data_dir>/cocostuff/annotations/<train2017|val2017>/<id>.png and the lists "
           "<data_dir>/cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt, "
           "<data_dir>/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
    folder="cocostuff",
    classes=tuple(zip(COCO_COARSE, pascal_colors(len(COCO_COARSE)), strict=True)),
    label_table=lookup_table({fine: COCO_COARSE.index(coarse) for fine, (_, coarse) in enumerate(COCO_FINE)}),
    splits={"train": ("train2017",), "val": ("val2017",), "train2017": ("train2017",),
            "val2017": ("val2017",)},
    archives=("cocostuff",),
)
