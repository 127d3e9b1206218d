"""Bad inputs through the real entry points , one table.

Each row builds a bad situation in ``tmp_path``, runs an entry point script as ``python
<script> <args>`` would (``runpy`` with ``sys.argv``, in this process to save the start-up
time; two rows also run as real subprocesses) and expects: exit status 2, exactly one
``error:`` line on stderr and no traceback, the line naming the thing, and nothing
half-written: no checkpoint of a failed training, no ``*.tmp`` file, no ``metrics.json``.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_module, run_script
from smooseg.data.synthetic import write_cityscapes_layout, write_directory_layout

pytestmark = pytest.mark.slow

# A tiny, fast training setup (ViT-S/16 random init, 32 px, 2 steps: one epoch, validated and
# checkpointed at its end); rows add to it.
TRAIN = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
         "batch_size=2", "num_workers=0", "logger=none", "max_steps=2", "val_check_interval=2",
         "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
         "data_dir={data}", "output_dir={out}"]
EVAL = ["model_paths=[{ckpt}]", "data_dir={data}", "output_dir={out}", "crf=false", "num_workers=0",
        "batch_size=2", "n_images=1", "device=cpu"]


class Payload:
    """Unpickling this creates a marker file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid data_dir (Cityscapes layout, 4 train / 2 val 32x64 scenes) and a valid checkpoint."""
    root = tmp_path_factory.mktemp("inputs")
    data = write_cityscapes_layout(root / "data", n_train=4, n_val=2, size=(32, 64), seed=0)
    torch.manual_seed(0)
    module = make_module(n_classes=27, dataset_name="cityscapes", model_type="vit_small",
                         patch_size=16, eval_res=32)
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "epoch": 0, "global_step": 0}, ckpt)
    return {"data": data, "ckpt": ckpt}


# ---- setups: each gets (tmp_path, pristine) and returns the values the args are formatted with

def copy_data(tmp, pristine):
    return Path(shutil.copytree(pristine["data"], tmp / "data"))


def valid(tmp, pristine):
    return {"data": pristine["data"]}


def no_data_dir(tmp, pristine):
    return {"data": tmp / "nowhere"}


def empty_data_dir(tmp, pristine):
    (tmp / "empty").mkdir()
    return {"data": tmp / "empty"}


def empty_val_split(tmp, pristine):
    data = copy_data(tmp, pristine)
    for image in (data / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"):
        image.unlink()
    return {"data": data}


def missing_label(tmp, pristine):
    data = copy_data(tmp, pristine)
    sorted((data / "cityscapes" / "gtFine" / "train").rglob("*_labelIds.png"))[1].unlink()
    return {"data": data}


def corrupt(path):
    """Cut the file in half, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_train_image(tmp, pristine):
    data = copy_data(tmp, pristine)
    image = sorted((data / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))[2]
    corrupt(image)
    return {"data": data, "bad": image.name}


def corrupt_val_image(tmp, pristine):
    data = copy_data(tmp, pristine)
    image = sorted((data / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
    corrupt(image)
    return {"data": data, "bad": image.name}


def directory_set(tmp, pristine, **kwargs):
    return write_directory_layout(tmp / "data", name="mine", n_train=4, n_val=2, size=(32, 32),
                                  **kwargs)


def directory_empty_train(tmp, pristine):
    data = directory_set(tmp, pristine)
    for image in (data / "mine" / "imgs" / "train").iterdir():
        image.unlink()
    return {"data": data}


def directory_extra_label(tmp, pristine):
    data = directory_set(tmp, pristine)
    labels = data / "mine" / "labels" / "train"
    shutil.copy(sorted(labels.iterdir())[0], labels / "zzz_extra.png")
    return {"data": data}


def directory_label_out_of_range(tmp, pristine):
    data = directory_set(tmp, pristine)
    label = sorted((data / "mine" / "labels" / "train").iterdir())[0]
    Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(label)
    return {"data": data, "bad": label.name}


def text_file_checkpoint(tmp, pristine):
    path = tmp / "notes.ckpt"
    path.write_text("these are not weights\n")
    return {"data": pristine["data"], "ckpt": path}


def other_architecture_checkpoint(tmp, pristine):
    """The valid checkpoint with its projector cut to 32 channels: the hparams say 64."""
    ckpt = torch.load(pristine["ckpt"], map_location="cpu", weights_only=True)
    ckpt["state_dict"]["net.projector.linear.weight"] = ckpt["state_dict"]["net.projector.linear.weight"][:32]
    path = tmp / "other.ckpt"
    torch.save(ckpt, path)
    return {"data": pristine["data"], "ckpt": path}


def malicious_checkpoint(tmp, pristine):
    path = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"n_classes": 27,
                                                       "x": Payload(str(tmp / "pwned"))}}, path)
    return {"data": pristine["data"], "ckpt": path}


def checkpoint_named(tmp, pristine):
    """The valid checkpoint in folders named 'a,b', 'd[1]' and 'é' under {odd}."""
    for name in ("a,b", "d[1]", "é"):
        (tmp / "odd" / name).mkdir(parents=True)
        shutil.copy(pristine["ckpt"], tmp / "odd" / name / "m.ckpt")
    return {"data": pristine["data"], "odd": tmp / "odd"}


def valid_checkpoint(tmp, pristine):
    return {"data": pristine["data"], "ckpt": pristine["ckpt"]}


def cut_short_crop_run(tmp, pristine):
    """A five-crop set as a killed ``crop_datasets.py`` run leaves it: 12 of the 20 crops on disk,
    no completion entry for the split."""
    from smooseg.data.crops import begin_record, crop_dataset, crop_folder, record_settings
    from smooseg.data.datasets import build_dataset

    data = copy_data(tmp, pristine)
    folder = crop_folder(data, "cityscapes", "five", 0.5)
    crop_dataset(build_dataset("cityscapes", data, "train", res=None), folder, "train", "five", 0.5,
                 progress=False)
    begin_record(folder, "train", record_settings("five", 0.5, 0, 75))
    for sub in ("img", "label"):
        for path in sorted((folder / sub / "train").iterdir())[12:]:
            path.unlink()
    return {"data": data, "folder": folder}


def directory_missing_label(tmp, pristine):
    data = directory_set(tmp, pristine)
    label = sorted((data / "mine" / "labels" / "train").iterdir())[2]
    label.unlink()
    return {"data": data, "bad": label.name}


def directory_colour_label(tmp, pristine):
    data = directory_set(tmp, pristine)
    label = sorted((data / "mine" / "labels" / "train").iterdir())[1]
    Image.fromarray(np.full((32, 32, 3), 2, dtype=np.uint8)).save(label)
    return {"data": data, "bad": label.name}


def large_photo(tmp, pristine):
    photos = tmp / "photos"
    photos.mkdir()
    Image.fromarray(np.full((300, 400, 3), 90, dtype=np.uint8)).save(photos / "large.png")
    return {"data": pristine["data"], "ckpt": pristine["ckpt"], "photos": photos}


# ---- extra checks for rows that expect more than the common ones

def payload_did_not_run(tmp, out, line):
    assert not (tmp / "pwned").exists()


def nothing_at_all(tmp, out, line):
    """Not even the output folder (a multirun makes it when its first job launches)."""
    assert not out.exists()


def last_good_checkpoint_kept(tmp, out, line):
    """lr1=1e30 blows the projector up in step 1: step 2's loss is NaN; step 1's checkpoint stays."""
    last = out / "checkpoints" / "last.ckpt"
    assert str(last) in line
    steps = {p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"]
             for p in (out / "checkpoints").glob("*.ckpt")}
    assert steps and max(steps.values()) == 1, steps


# ---- a run folder that is taken (tests/test_run_folder.py has the live-process story)

HELD_LOCKS = {}


def folder_with_a_run(tmp, pristine):
    """``out`` as a finished run leaves it: ``checkpoints/last.ckpt``."""
    last = tmp / "out" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(pristine["ckpt"], last)
    return {"data": pristine["data"]}


def folder_of_a_running_training(tmp, pristine):
    """``out/.lock`` held (``flock``) as a running training holds it, until the row's check."""
    import fcntl
    import os

    (tmp / "out").mkdir()
    fd = os.open(tmp / "out" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    HELD_LOCKS[tmp] = fd
    return {"data": pristine["data"]}


def no_config_written(tmp, out, line):
    """Refused before anything was written: no config.yaml; a held lock is let go."""
    import os

    if tmp in HELD_LOCKS:
        os.close(HELD_LOCKS.pop(tmp))
    assert not (out / "config.yaml").exists()


@dataclass
class Case:
    name: str
    setup: Callable  # (tmp_path, pristine) -> values the args and expectations are formatted with
    script: str
    args: list
    expect: list  # substrings of the error line
    check: Callable | None = None  # (tmp_path, output_dir, error line) -> asserts more
    keeps_checkpoint: bool = False
    started: bool = False  # the error comes while the run works (its folder claimed), not before


# ---- filesystem setups (output_dir / data_dir / checkpoints / cache that are files or folders)

def a_file(tmp, pristine):
    """A regular file at {tmp}/afile (a path under it cannot be created, even by root)."""
    (tmp / "afile").write_text("not a folder\n")
    return {"data": pristine["data"], "ckpt": pristine["ckpt"], "file": tmp / "afile"}


def a_file_and_photos(tmp, pristine):
    return {**a_file(tmp, pristine), "photos": large_photo(tmp, pristine)["photos"]}


def checkpoint_folder(tmp, pristine):
    """A run folder where a checkpoint was meant: runs/a/ (a folder) next to runs/b.ckpt."""
    (tmp / "runs" / "a").mkdir(parents=True)
    shutil.copy(pristine["ckpt"], tmp / "runs" / "b.ckpt")
    return {"data": pristine["data"], "ckpt": pristine["ckpt"]}


def directory_set_and_checkpoint(tmp, pristine):
    return {"data": directory_set(tmp, pristine), "ckpt": pristine["ckpt"]}


EVAL_NO_OUT = [arg for arg in EVAL if not arg.startswith("output_dir=")]


T, E = "train_segmentation.py", "eval_segmentation.py"
CASES = [
    # data location and layout
    Case("train: data_dir missing", no_data_dir, T, TRAIN, ["{data}", "does not exist", "expected layout"]),
    Case("eval: data_dir missing", lambda t, p: {**no_data_dir(t, p), "ckpt": p["ckpt"]}, E, EVAL,
         ["{data}", "does not exist"]),
    Case("train: data set folder missing", empty_data_dir, T, TRAIN,
         ["cityscapes", "not found", "expected layout", "leftImg8bit"]),
    Case("eval: data set folder missing", lambda t, p: {**empty_data_dir(t, p), "ckpt": p["ckpt"]}, E,
         EVAL, ["cityscapes", "not found", "expected layout"]),
    Case("train: empty split", empty_val_split, T, TRAIN, ["no *_leftImg8bit.png images", "val"]),
    Case("train: empty directory split", directory_empty_train, T,
         TRAIN + ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine"],
         ["no images in", "train"]),
    # image / label mismatch, unreadable files, bad label ids
    Case("train: image without label", missing_label, T, TRAIN, ["images but", "label maps", "missing"]),
    Case("train: more labels than images", directory_extra_label, T,
         TRAIN + ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine"],
         ["4 images", "5 labels"]),
    Case("train: corrupt image", corrupt_train_image, T, TRAIN, ["cannot read image", "{bad}"], started=True),
    Case("train: corrupt image read by a DataLoader worker", corrupt_train_image, T,
         TRAIN + ["num_workers=2"], ["cannot read image", "{bad}"], started=True),
    Case("eval: corrupt image", lambda t, p: {**corrupt_val_image(t, p), "ckpt": p["ckpt"]}, E, EVAL,
         ["cannot read image", "{bad}"]),
    Case("train: label id out of range", directory_label_out_of_range, T,
         TRAIN + ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine"],
         ["{bad}", "class id 9", "n_classes=6"]),
    # unknown names and keys
    Case("train: unknown data set preset", valid, T, TRAIN + ["dataset=mars"],
         ["unknown dataset 'mars'", "cityscapes"]),
    Case("train: unknown data set name", valid, T, TRAIN + ["dataset.name=mars"], ["dataset.name=mars"]),
    Case("eval: unknown data set", valid_checkpoint, E, EVAL + ["dataset=mars"], ["unknown dataset 'mars'"]),
    Case("train: unknown arch", valid, T, TRAIN + ["model.arch=resnet"], ["arch=resnet", "choose one of"]),
    Case("train: unknown model preset", valid, T, TRAIN + ["model=vit_huge"], ["unknown model 'vit_huge'"]),
    Case("train: unknown config key", valid, T, TRAIN + ["learning_rate=0.1"],
         ["unknown config key 'learning_rate'"]),
    Case("train: unknown nested config key", valid, T, TRAIN + ["optim.lr3=0.1"],
         ["unknown config key 'optim.lr3'"]),
    Case("eval: unknown config key", valid_checkpoint, E, EVAL + ["flipp=true"],
         ["unknown config key 'flipp'", "did you mean flip?", "flip=true"]),
    Case("train: misspelt config key", valid, T, TRAIN + ["loss.temprature=0.2"],
         ["unknown config key 'loss.temprature'", "did you mean loss.temperature?", "loss.temperature=0.2"]),
    Case("train: key of the reference's config", valid, T, TRAIN + ["--dino_patch_size", "16"],
         ["unknown config key 'dino_patch_size'", "the reference's dino_patch_size is model.patch_size here",
          "pass model.patch_size=16"]),
    Case("train: reference key without a counterpart", valid, T, TRAIN + ["n_feats=384"],
         ["unknown config key 'n_feats'", "no counterpart", "derived from the backbone"]),
    Case("eval: key of the reference's config", valid_checkpoint, E, EVAL + ["res=320"],
         ["unknown config key 'res'", "is eval_res here", "pass eval_res=320"]),
    Case("train: swept unknown key", valid, T, ["-m"] + TRAIN + ["seed=0,1", "loss.temprature=0.1,0.2"],
         ["did you mean loss.temperature?", "loss.temperature=0.1,0.2"], check=nothing_at_all),
    Case("train: key added to a section that does not take it", valid, T, TRAIN + ["+loss.temprature=0.2"],
         ["loss.temprature is not one of the loss settings", "temperature"]),
    Case("eval: bad CRF worker count", valid_checkpoint, E,
         EVAL[:4] + ["crf=true", "crf_workers=many"] + EVAL[5:],
         ["crf_workers=many is not allowed", "crf_workers must be auto or an integer >= 0"]),
    Case("train: unparsable override", valid, T, TRAIN + ["seed=["], ["cannot parse", "seed=["]),
    Case("train: not a Trainer argument", valid, T, TRAIN + ["+trainer.gpus=2"], ["trainer.*", "gpus"]),
    Case("eval: required key missing", valid_checkpoint, E, EVAL[1:], ["model_paths", "required"]),
    # checkpoints
    Case("eval: checkpoint missing", lambda t, p: {"data": p["data"], "ckpt": t / "absent.ckpt"}, E, EVAL,
         ["absent.ckpt", "not found"]),
    Case("eval: checkpoint pattern that matches nothing", valid_checkpoint, E,
         ["model_paths={tmp}/runs/*/checkpoints/best-*.ckpt"] + EVAL[1:],
         ["model_paths pattern '{tmp}/runs/*/checkpoints/best-*.ckpt' matches no file"]),
    Case("eval: not a checkpoint", text_file_checkpoint, E, EVAL, ["notes.ckpt", "not a SmooSeg checkpoint"]),
    Case("eval: checkpoint of another architecture", other_architecture_checkpoint, E, EVAL,
         ["other.ckpt", "does not fit", "projector.linear.weight"]),
    Case("eval: checkpoint with code in its pickle", malicious_checkpoint, E, EVAL,
         ["evil.ckpt", "refused"], check=payload_did_not_run),
    Case("train: resume checkpoint missing", valid, T, TRAIN + ["ckpt_path={tmp}/absent.ckpt"],
         ["absent.ckpt", "not found"]),
    Case("train: resume from last with no checkpoint", valid, T, TRAIN + ["ckpt_path=last"],
         ["last.ckpt", "not found"]),
    Case("train: resume from not a checkpoint", text_file_checkpoint, T, TRAIN + ["ckpt_path={ckpt}"],
         ["notes.ckpt", "not a SmooSeg checkpoint"]),
    Case("train: resume from another architecture", valid_checkpoint, T,
         TRAIN + ["ckpt_path={ckpt}", "model.dim=32"], ["model.ckpt", "does not fit"]),
    Case("train: resume from a checkpoint with code in its pickle", malicious_checkpoint, T,
         TRAIN + ["ckpt_path={ckpt}"], ["evil.ckpt", "refused"], check=payload_did_not_run),
    Case("train: published Cityscapes setting without its five-crop set", valid, T,
         TRAIN + ["dataset=cityscapes"],
         ["cropped/cityscapes_five_crop_0.5 does not exist", "python crop_datasets.py data_dir={data} "
          "datasets=[cityscapes] crop_types=[five] crop_ratio=0.5", "dataset.train_crop_source=null"]),
    Case("train: unlabelled tiles asked for outside Potsdam", valid, T,
         TRAIN + ["dataset.train_unlabelled=true"], ["train_unlabelled=true is for potsdam only"]),
    Case("train: + before a key that exists", valid, T, TRAIN + ["+dataset.train_unlabelled=true"],
         ["dataset.train_unlabelled is a setting already",
          "pass dataset.train_unlabelled=true (without the +)"]),
    # sizes and numerics
    Case("train: size not a multiple of the patch", valid, T, TRAIN + ["res=40"],
         ["40x40", "patch size 16", "model.fit"]),
    Case("train: final evaluation size not a multiple of the patch", valid, T, TRAIN + ["eval_res=40"],
         ["eval_res=40", "40x40", "patch size 16", "model.fit=resize", "final_eval.enabled=false"]),
    Case("eval: size not a multiple of the patch", valid_checkpoint, E, EVAL + ["eval_res=40"],
         ["40x40", "patch size 16"]),
    Case("train: batch larger than the training set", valid, T, TRAIN + ["batch_size=8"],
         ["4 images", "batch_size=8"]),
    Case("train: non-finite loss", valid, T,
         TRAIN + ["optim.lr1=1e30", "max_steps=3", "val_check_interval=1"],
         ["non-finite", "step 2", "last good checkpoint"], check=last_good_checkpoint_kept,
         keeps_checkpoint=True, started=True),
    # part-written data and files that cannot be read right
    Case("train: cropped set left incomplete by a killed crop run", cut_short_crop_run, T,
         TRAIN + ["dataset=cityscapes"],
         ["{folder} is incomplete", "no completion entry for split train",
          "finish it with `python crop_datasets.py data_dir={data} datasets=[cityscapes] crop_types=[five] "
          "crop_ratio=0.5`", "dataset.train_crop_source=null"]),
    Case("train: directory image without its label", directory_missing_label, T,
         TRAIN + ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine"],
         ["4 images", "3 labels", "do not pair up", "1 image(s) have no label ({bad})", "<stem>_gt.png"]),
    Case("train: directory label that is a colour image", directory_colour_label, T,
         TRAIN + ["dataset=directory", "dataset.n_classes=6", "dataset.dir_name=mine"],
         ["{bad}", "has mode RGB", "a label is a single-channel PNG", "class ids 0..5"]),
    Case("segment: dense CRF too large for the memory allowed", large_photo, "segment_images.py",
         ["model_path={ckpt}", "input_dir={photos}", "output_dir={out}", "crf=true", "crf_max_memory=1MB",
          "device=cpu", "progress=false"],
         ["the dense CRF of {photos}/large.png (400x300 px)", "needs about", "crf_max_memory=1MB allows",
          "crf=false"], check=nothing_at_all),
    *[Case(f"segment: {arg}", large_photo, "segment_images.py",
           ["model_path={ckpt}", "input_dir={photos}", "output_dir={out}", "crf=true", arg, "device=cpu",
            "progress=false"], [expect], check=nothing_at_all)
      for arg, expect in [("crf_max_pixels=0", "crf_max_pixels=0 is not allowed: crf_max_pixels must be an "
                                               "integer >= 1"),
                          ("crf_max_memory=lots", "crf_max_memory='lots' is not a memory size")]],
    *([] if torch.cuda.is_available() else [
        Case("train: trainer=gpu on a machine without CUDA", valid, T, TRAIN + ["trainer=gpu"],
             ["trainer.accelerator=gpu", "no CUDA GPU", "trainer=cpu"])]),
    # values of the wrong type or out of range: one line naming the key and the allowed range
    *[Case(f"train: {arg}", valid, T, TRAIN + [arg], [arg, expect])
      for arg, expect in [("batch_size=abc", "an integer >= 1"), ("batch_size=0", "an integer >= 1"),
                          ("batch_size=2.5", "an integer >= 1"), ("res=-32", "res must be an integer >= 1"),
                          ("val_check_interval=0", "an integer >= 1"), ("max_steps=-1", "an integer >= 1"),
                          ("optim.lr1=-0.001", "a number > 0"), ("num_workers=-1", "an integer >= 0"),
                          ("loss.temperature=0", "a number > 0"), ("loss.ema_alpha=1.5", "in [0.0, 1.0]")]],
    # every setting is checked before anything is written, also those used only at the run's end
    *[Case(f"train: {arg}", valid, T, TRAIN + [arg], [f"{arg} is not allowed", expect])
      for arg, expect in [
          ("final_eval.crf_backend=torhc", "one of auto, pydensecrf, torch"),
          ("final_eval.precision=bf17", "final_eval.precision must be one of auto, 32"),
          ("perf.backbone_precision=bf17", "one of auto, 32, bf16, 16"),
          ("final_eval.crf_workers=-1", "auto or an integer >= 0"),
          ("cache.dtype=float8", "one of float16, float32"),
          ("loader.pin_memory=maybe", "one of auto, true, false"),
          # booleans written another way are understood (off, no, 0) or refused, never read as true
          ("model.dropout=maybe", "true or false"), ("final_eval.flip=2", "true or false"),
          # an integer setting given a fraction is refused, not truncated
          ("dataset.n_classes=2.5", "an integer >= 1"), ("extra_clusters=1.5", "an integer >= 0"),
          ("seed=4294967296", "seed must be an integer in [0, 4294967295]"), ("seed=-1", "[0, 4294967295]"),
          ("trainer.precision=32-tru", "trainer.precision must be one of auto"),
          ("trainer.precision=bf17", "bf16-mixed"),
          ("trainer.accumulate_grad_batches=0", "an integer >= 1"),
          ("trainer.num_nodes=1.5", "an integer >= 1"),
      ]],
    Case("train: unset environment variable", valid, T,
         [a for a in TRAIN if not a.startswith("data_dir=")]
         + ["data_dir=${{oc.env:SMOOSEG_UNSET_FOR_TEST}}"],
         ["data_dir", "environment variable SMOOSEG_UNSET_FOR_TEST", "not set"]),
    *[Case(f"eval: {arg}", valid_checkpoint, E, EVAL + [arg], [f"{arg} is not allowed", expect])
      for arg, expect in [("crf_backend=torhc", "one of auto, pydensecrf, torch"),
                          ("flip=maybe", "true or false"), ("precision=bf17", "one of auto"),
                          ("batch_size=2.5", "an integer >= 1")]],
    *[Case(f"segment: {arg}", large_photo, "segment_images.py",
           ["model_path={ckpt}", "input_dir={photos}", "output_dir={out}", "device=cpu", arg],
           [f"{arg} is not allowed", expect], check=nothing_at_all)
      for arg, expect in [("precision=bf17", "one of auto"), ("mode=tiles", "one of resize, window"),
                          ("alpha=1.5", "in [0.0, 1.0]"), ("progress=perhaps", "true or false")]],
    # a reference-style flag left without its value reads as true: a typed key refuses it
    Case("train: --max_steps with no value", valid, T, TRAIN + ["--max_steps"],
         ["max_steps=true is not allowed", "an integer >= 1"]),
    *[Case(f"eval: {arg}", valid_checkpoint, E, EVAL + [arg], [arg, expect])
      for arg, expect in [("eval_res=0", "an integer >= 1"), ("n_images=-1", "an integer >= 0")]],
    # filesystem: output folders that are files, inputs that are folders, checks before any work
    Case("eval: output_dir an existing file", a_file, E, EVAL_NO_OUT + ["output_dir={file}"],
         ["output_dir={file} is an existing file, not a folder", "pass output_dir="]),
    Case("eval: output_dir under a file", a_file, E, EVAL_NO_OUT + ["output_dir={file}/eval"],
         ["output_dir={file}/eval cannot be created", "{file} is a file", "pass output_dir="]),
    Case("train: output_dir an existing file", a_file, T,
         [arg for arg in TRAIN if not arg.startswith("output_dir=")] + ["output_dir={file}"],
         ["{file}", "output_dir"]),
    Case("train: output_dir under a file", a_file, T,
         [arg for arg in TRAIN if not arg.startswith("output_dir=")] + ["output_dir={file}/run"],
         ["{file}/run", "output_dir"]),
    Case("segment: output_dir under a file", a_file_and_photos, "segment_images.py",
         ["model_path={ckpt}", "input_dir={photos}", "output_dir={file}/seg", "device=cpu", "progress=false"],
         ["output_dir={file}/seg cannot be created", "{file} is a file"]),
    Case("segment: model_path a folder", large_photo, "segment_images.py",
         ["model_path={tmp}", "input_dir={photos}", "output_dir={out}", "device=cpu", "progress=false"],
         ["model_path={tmp} is a folder, not a file", ".ckpt"], check=nothing_at_all),
    Case("eval: data_dir a file", a_file, E,
         ["model_paths=[{ckpt}]", "data_dir={file}"] + EVAL[2:], ["data_dir {file} is a file, not a folder"]),
    Case("eval: checkpoint pattern that matches a folder", checkpoint_folder, E,
         ["model_paths={tmp}/runs/*"] + EVAL[1:], ["checkpoint {tmp}/runs/a is a folder, not a file"]),
    Case("eval: every checkpoint checked before the first is evaluated", valid_checkpoint, E,
         ["model_paths=[{ckpt},{tmp}/absent.ckpt]"] + EVAL[1:],
         ["checkpoint {tmp}/absent.ckpt not found", "'model_paths=[\"a=b.ckpt\"]'"]),
    Case("eval: checkpoint path with an unquoted =", valid_checkpoint, E,
         ["model_paths=[{tmp}/a=b.ckpt]"] + EVAL[1:],
         ["cannot parse", "a=b.ckpt", "must be quoted", "'model_paths=[\"{tmp}/a=b.ckpt\"]'"]),
    # paths that Hydra reads as syntax: each message gives the quoted override that works
    *[Case(f"eval: checkpoint path with {what}", checkpoint_named, E, [arg] + EVAL[1:], expect)
      for what, arg, expect in [
          ("'[' unquoted", "model_paths=[{odd}/d[1]/m.ckpt]",
           ["cannot parse", "must be quoted: 'model_paths=[\"{odd}/d[1]/m.ckpt\"]'"]),
          ("non-ASCII letters unquoted", "model_paths={odd}/é/m.ckpt",
           ["cannot parse", "must be quoted: 'model_paths=\"{odd}/é/m.ckpt\"'"]),
          ("',' in a list", "model_paths=[{odd}/a,b/m.ckpt]",
           ["checkpoint {odd}/a not found, but {odd}/a,b/m.ckpt is a file",
            "quote it: 'model_paths=[\"{odd}/a,b/m.ckpt\"]'"])]],
    Case("segment: checkpoint path with ',' unquoted", checkpoint_named, "segment_images.py",
         ["model_path={odd}/a,b/m.ckpt", "input_dir={odd}", "output_dir={out}", "progress=false"],
         ["',' separates the values of a sweep", "quote it: 'model_path=\"{odd}/a,b/m.ckpt\"'"]),
    Case("eval: dataset.n_classes contradicting the checkpoint", directory_set_and_checkpoint, E,
         EVAL + ["dataset=directory", "dataset.n_classes=5", "dataset.dir_name=mine"],
         ["dataset.n_classes=5 contradicts the checkpoint", "27 classes", "dataset.n_classes=27"]),
    Case("eval: data set contradicting the checkpoint", valid_checkpoint, E, EVAL + ["dataset=cocostuff27"],
         ["dataset=cocostuff27 contradicts the checkpoint", "trained on cityscapes"]),
    Case("train: model.weights_path a folder", valid, T,
         TRAIN + ["model.pretrained=true", "model.weights_path={tmp}"],
         ["model.weights_path={tmp} is a folder, not a file"]),
    Case("train: feature cache folder cannot be created", a_file, T,
         TRAIN + ["cache.enabled=true", "cache.dir={file}/cache"],
         ["cache.dir={file}/cache cannot be created", "{file} is a file"]),
    # expected archive sizes and checksums, keyed by archive name, checked before anything is fetched
    *[Case(f"download: {arg}", valid, "download_datasets.py",
           ["data_dir={out}", "datasets=[cityscapes]", "base_url=http://127.0.0.1:9/", "progress=false",
            arg], expect, check=nothing_at_all)
      for arg, expect in [
          ("sha256.cityscapes=abc", ["sha256.cityscapes=abc is not allowed", "64 hexadecimal digits"]),
          ("sizes.cityscapes=abc", ["sizes.cityscapes=abc is not allowed", "an integer"]),
          ("sizes.cityscapes=0", ["sizes.cityscapes=0 is not allowed", "an integer >= 1"]),
          ("sizes.potsdam=5", ["sizes.potsdam: this download fetches no archive named 'potsdam'",
                               "sizes.cityscapes=..."])]],
    # a run folder is never overwritten
    Case("train: output_dir holds a run", folder_with_a_run, T, TRAIN,
         ["output_dir={out} already holds a run", "resume it with ckpt_path=last",
          "choose another output_dir"],
         check=no_config_written, keeps_checkpoint=True),
    Case("train: output_dir of a running training", folder_of_a_running_training, T,
         TRAIN + ["ckpt_path=null"],
         ["output_dir={out} is being written by a running training (process 4242",
          "choose another output_dir"],
         check=no_config_written),
]


def check_failure(case, values, tmp, out, status, stderr, existed=False):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    for expected in case.expect:
        assert expected.format(**values) in lines[0], lines[0]
    if not case.keeps_checkpoint:
        assert not list(out.rglob("*.ckpt"))
    assert not [p for p in tmp.rglob("*") if p.name.endswith(".tmp")]
    assert not list(tmp.rglob("metrics.json"))
    if not (case.started or existed):  # nothing written before a run can start: no folder, no log
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    if case.check is not None:
        case.check(tmp, out, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_error(case, pristine, tmp_path, entry_point):
    out = tmp_path / "out"
    values = {"out": out, "tmp": tmp_path, "ckpt": pristine["ckpt"], **case.setup(tmp_path, pristine)}
    args = [arg.format(**values) for arg in case.args]
    existed = out.exists()
    proc = entry_point(case.script, *args)
    check_failure(case, values, tmp_path, out, proc.returncode, proc.stderr, existed)


@pytest.mark.parametrize("name", ["train: unknown config key", "train: key of the reference's config",
                                  "train: corrupt image read by a DataLoader worker"])
def test_same_in_a_real_process(name, pristine, tmp_path):
    """The in-process runner above behaves as ``python <script>``: checked on three rows."""
    case = next(c for c in CASES if c.name == name)
    out = tmp_path / "out"
    values = {"out": out, "tmp": tmp_path, "ckpt": pristine["ckpt"], **case.setup(tmp_path, pristine)}
    proc = run_script(case.script, *[arg.format(**values) for arg in case.args], check=False)
    check_failure(case, values, tmp_path, out, proc.returncode, proc.stderr)

