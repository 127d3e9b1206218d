"""The Python API (docs/python.md): lazy import, the documented examples, and segment() giving
exactly what segment_images.py writes for the same image and settings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smooseg
from conftest import run_script, save_spread_checkpoint
from smooseg.errors import SmoosegError
from smooseg.eval.provenance import file_sha256

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES, EXTRA = 3, 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init ViT-S/16 SmooSeg model (3 classes + 1 extra cluster) saved in the native layout."""
    return save_spread_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", N_CLASSES, EXTRA)


def _photo(h, w, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 3] = rng.integers(0, 255, 3)
    img[:, w // 3:] = rng.integers(0, 255, 3)
    img[h // 2:] = rng.integers(0, 255, (h - h // 2, w, 3))
    return img


def test_import_is_lazy_and_names_the_surface():
    code = ("import sys, smooseg; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(smooseg.__all__)); print(set(smooseg.__all__) <= set(dir(smooseg)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    surface = ["Segmentation", "Segmenter", "backbones", "eval_settings", "evaluate", "load", "train",
               "train_settings"]
    assert proc.stdout.split("\n")[:2] == [str(surface), "True"]
    assert callable(smooseg.train) and callable(smooseg.evaluate)
    __import__("smooseg.train.train")  # the training package, now smooseg.train, is callable too
    assert callable(smooseg.train)


def test_backbones_lists_the_registry():
    from smooseg.model.backbones import list_backbones

    assert smooseg.backbones() == list_backbones()
    assert {"dino/vit_small/8", "dinov2_reg/vit_small/14", "dinov3/vit_small/16"} <= set(smooseg.backbones())


@pytest.mark.parametrize("mode", ["resize", "window"])
def test_segment_equals_segment_images(tmp_path, checkpoint, mode):
    """Odd-sized PIL, numpy and tensor inputs give maps of the input's size, equal to the ids
    segment_images.py writes for the same image and settings."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shapes = {"odd": (75, 101), "tall": (53, 37)}
    for name, (h, w) in shapes.items():
        Image.fromarray(_photo(h, w, len(name))).save(photos / f"{name}.png")
    run_script("segment_images.py", f"model_path={checkpoint}", f"input_dir={photos}",
               f"output_dir={tmp_path / 'out'}", f"mode={mode}", "size=32", "stride=16", "save_ids=true",
               "progress=false", "device=cpu")
    seg = smooseg.load(checkpoint, device="cpu", mode=mode, size=32, stride=16)
    for name, (h, w) in shapes.items():
        written = np.asarray(Image.open(tmp_path / "out" / f"{name}_ids.png"))
        pil = Image.open(photos / f"{name}.png")
        array = np.array(pil.convert("RGB"))
        r = seg.segment(pil)
        assert r.clusters.shape == (h, w) and r.classes is None
        assert (r.clusters == written).all()
        assert (seg.segment(array).clusters == written).all()
        assert (seg.segment(torch.from_numpy(array).permute(2, 0, 1)).clusters == written).all()
        assert (seg.segment(photos / f"{name}.png").clusters == written).all()
    odd, tall = (np.asarray(Image.open(photos / f"{n}.png").convert("RGB")) for n in ("odd", "tall"))
    batch = seg.segment([odd, tall, odd[:, ::-1].copy(), odd])        # the three odd ones batched together
    assert [r.clusters.shape for r in batch] == [(75, 101), (53, 37), (75, 101), (75, 101)]
    for got, alone in zip(batch, [odd, tall, odd[:, ::-1].copy(), odd], strict=True):
        assert (got.clusters == seg.segment(alone).clusters).mean() > 0.999   # float noise of a batch aside


def test_segment_with_crf_equals_segment_images(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(61, 90, 3)).save(photos / "p.png")
    run_script("segment_images.py", f"model_path={checkpoint}", f"input_dir={photos}",
               f"output_dir={tmp_path / 'out'}", "size=32", "crf=true", "crf_backend=pydensecrf",
               "save_ids=true", "progress=false", "device=cpu")
    seg = smooseg.load(checkpoint, device="cpu", size=32, crf_backend="pydensecrf")
    try:
        r = seg.segment(Image.open(photos / "p.png"), crf=True)
    finally:
        seg.close()
    assert (r.clusters == np.asarray(Image.open(tmp_path / "out" / "p_ids.png"))).all()


def _metrics_json(path, assignment, sha256):
    names = ["roads", "buildings", "trees"]
    data = {"mIoU": 10.0, "Accuracy": 20.0, "per_class_iou": dict.fromkeys(names, 1.0),
            "assignment": dict(zip(names, assignment, strict=True)),
            "provenance": {"checkpoint": {"sha256": sha256}}}
    path.write_text(json.dumps(data))
    return path


def test_matching_gives_classes_and_belongs_to_its_checkpoint(tmp_path, checkpoint):
    own = _metrics_json(tmp_path / "own.json", [2, 3, 0], file_sha256(checkpoint))
    seg = smooseg.load(checkpoint, device="cpu", matching=own, size=32)
    r = seg.segment(_photo(40, 57, 0))
    class_of_cluster = np.array([2, -1, 0, 1])           # roads <- 2, buildings <- 3, trees <- 0
    assert (r.classes == class_of_cluster[r.clusters]).all()
    assert seg.class_names == ["roads", "buildings", "trees"]
    other = _metrics_json(tmp_path / "other.json", [2, 3, 0], "0" * 64)
    with pytest.raises(SmoosegError, match="evaluation of another checkpoint"):
        smooseg.load(checkpoint, device="cpu", matching=other)


def test_bad_inputs_say_what_to_pass(checkpoint):
    seg = smooseg.load(checkpoint, device="cpu", size=32)
    with pytest.raises(SmoosegError, match="H×W×3 uint8"):
        seg.segment(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(SmoosegError, match="3×H×W"):
        seg.segment(torch.zeros(20, 20, 3))
    with pytest.raises(SmoosegError, match="mode=tile"):
        smooseg.load(checkpoint, device="cpu", mode="tile")


def python_blocks(markdown):
    """The ```python code blocks of a markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_docs_examples_run(tmp_path):
    """Every example of docs/python.md, in order, as one script in an empty folder."""
    blocks = python_blocks((ROOT / "docs" / "python.md").read_text())
    assert len(blocks) >= 5
    script = tmp_path / "examples.py"
    script.write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(ROOT),
                                            "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "(75, 101)" in proc.stdout and "None" in proc.stdout
    assert list((tmp_path / "eval").glob("last-*/metrics.json"))
