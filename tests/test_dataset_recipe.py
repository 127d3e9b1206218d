"""The "add a data set" recipe (docs/extending.md), done inside the test: a toy data set spec with
its own label map and colours plus its YAML, its files written by the synthetic writers, then
trained and evaluated through the real entry-point functions, with no other file changed."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import ROOT
from smooseg.data import registry
from smooseg.data.sets.cityscapes import CityscapesReader
from smooseg.data.spec import DatasetSpec, lookup_table
from smooseg.data.synthetic import BUILDING, CAR, ROAD, SIDEWALK, SKY, VEGETATION, write_cityscapes_layout

# The recipe's module: one spec. Files in the Cityscapes layout under <data_dir>/toystreets/,
# labelIds merged into five classes of its own, each with its own colour.
TOY = DatasetSpec(
    name="toystreets",
    reader=CityscapesReader,
    layout="<data_dir>/toystreets/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
           "<data_dir>/toystreets/gtFine/<split>/<city>/<name>_gtFine_labelIds.png",
    folder="toystreets",
    classes=(("ground", (90, 60, 20)), ("building", (200, 120, 40)), ("plant", (30, 160, 30)),
             ("sky", (100, 180, 250)), ("car", (230, 20, 20))),
    label_table=lookup_table({ROAD: 0, SIDEWALK: 0, BUILDING: 1, VEGETATION: 2, SKY: 3, CAR: 4}),
    splits={"train": ("train",), "val": ("val",)},
    eval_res=32,
)

# The recipe's YAML: smooseg/configs/dataset/toystreets.yaml.
TOY_YAML = """name: toystreets
n_classes: null
dir_name: null
train_crop: center
train_crop_source: null
image_interp: nearest
"""


@pytest.fixture
def toy(tmp_path):
    registry.register(TOY)
    config_dir = tmp_path / "conf"
    (config_dir / "dataset").mkdir(parents=True)
    (config_dir / "dataset" / "toystreets.yaml").write_text(TOY_YAML)
    data = write_cityscapes_layout(tmp_path / "data", n_train=4, n_val=2, size=(32, 64), seed=0)
    (data / "cityscapes").rename(data / "toystreets")
    yield {"data": data, "conf": config_dir}
    registry.unregister(TOY.name)


def compose_config(name, overrides, search_dir):
    import smooseg.settings  # noqa: F401  (registers the typed schemas)

    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=[*overrides, f"hydra.searchpath=[file://{search_dir}]"])


def train_toy(cfg):
    """Train through the real entry-point function (the one place its signature is used)."""
    from smooseg.settings import train_settings
    from smooseg.train.train import train

    return train(train_settings(cfg))


def test_a_new_data_set_trains_and_evaluates_through_the_entry_points(toy, tmp_path):
    from smooseg.eval.evaluate import run_eval
    from smooseg.settings import eval_settings

    cfg = compose_config("train", [
        "experiment=demo", "dataset=toystreets", "model=dino_vits16", "model.pretrained=false", "res=32",
        "eval_res=32", "batch_size=2", "num_workers=0", "logger=none", "max_steps=2", "val_check_interval=2",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        "final_eval.enabled=false",
        f"data_dir={toy['data']}", f"output_dir={tmp_path / 'run'}"], toy["conf"])
    result = train_toy(cfg)
    checkpoint = result["best"] or result["last"]
    eval_cfg = compose_config("eval", [
        f"model_paths=[{checkpoint}]", f"data_dir={toy['data']}", f"output_dir={tmp_path / 'eval'}",
        "crf=false", "n_images=1", "batch_size=2", "num_workers=0"], toy["conf"])
    (metrics,) = run_eval(eval_settings(eval_cfg))
    assert list(metrics["per_class_iou"]) == list(TOY.class_names)
    assert metrics["n_evaluated"] == 2
    written = json.loads(next((tmp_path / "eval").rglob("metrics.json")).read_text())
    assert list(written["assignment"]) == list(TOY.class_names)
    label = np.asarray(Image.open(next((tmp_path / "eval").rglob("*label.png"))).convert("RGB"))
    colours = {tuple(c) for c in label.reshape(-1, 3)}
    assert (100, 180, 250) in colours and colours <= set(TOY.colors) | {(0, 0, 0)}   # its own palette


def test_unlabelled_photos_train_with_n_clusters_and_no_val_folder(tmp_path):
    """Own photos without labels, all in imgs/train: dataset.n_clusters sets the clusters to find."""
    from smooseg.data.synthetic import write_directory_layout
    from smooseg.model.checkpoints import load_net

    data = write_directory_layout(tmp_path / "data", name="photos", n_train=4, n_val=0, size=(32, 32),
                                  with_labels=False)
    assert not (data / "photos/imgs/val").exists()
    cfg = compose_config("train", [
        "experiment=demo", "dataset=directory", "dataset.dir_name=photos", "dataset.n_clusters=4",
        "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32", "batch_size=2",
        "num_workers=0", "logger=none", "max_steps=2", "val_check_interval=2",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        f"data_dir={data}", f"output_dir={tmp_path / 'run'}"], tmp_path)
    result = train_toy(cfg)
    assert result["best"] is None and result["final_eval"] is None
    net, hparams = load_net(result["last"])
    assert hparams["data"]["n_classes"] == 4 and hparams["data"]["name"] == "directory"
    assert net.config.n_clusters == 4
