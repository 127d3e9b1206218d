import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import make_module
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import evaluate
from smooseg.eval.report import (
    REPORT_FILES,
    confusion_heatmap,
    example_grid,
    find_examples,
    iou_bar_chart,
    ordered_confusion,
    write_report,
)
from smooseg.eval.results import write_outputs
from smooseg.viz import read_metrics_json, save_png

NAMES = ["road", "building", "vegetation"]


def _png(path, min_size=(100, 100)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        assert img.width >= min_size[0] and img.height >= min_size[1]
        return np.asarray(img.convert("RGB"))


def test_ordered_confusion_by_hand():
    confusion = np.array([[0, 5],     # cluster 0 -> mostly class 1
                          [4, 1],     # cluster 1 -> class 0
                          [0, 0],     # cluster 2: no pixels
                          [2, 2]])    # cluster 3: unmatched
    matrix, order = ordered_confusion(confusion, assignment=[1, 0])
    assert order.tolist() == [1, 0, 2, 3]
    assert np.allclose(matrix, [[0.8, 0.2], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]])
    with pytest.raises(SmoosegError, match="do not fit"):
        ordered_confusion(confusion, assignment=[1, 0, 2])


def test_iou_bar_chart_with_nan(tmp_path):
    path = iou_bar_chart(NAMES, [55.0, float("nan"), None], tmp_path / "iou.png", title="t")
    pixels = _png(path, (300, 100))
    assert (pixels != 255).any()
    with pytest.raises(SmoosegError, match="3 class names but 2"):
        iou_bar_chart(NAMES, [1.0, 2.0], tmp_path / "x.png")


def test_confusion_heatmap(tmp_path):
    confusion = np.arange(12).reshape(4, 3)
    path = confusion_heatmap(confusion, NAMES, [2, 0, 1], tmp_path / "c.png")
    _png(path, (200, 200))
    with pytest.raises(SmoosegError, match="2 class names for 3 columns"):
        confusion_heatmap(confusion, NAMES[:2], [2, 0, 1], tmp_path / "c2.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]   # nothing half-written


def test_example_grid_from_arrays_and_paths(tmp_path):
    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = 255
    paths = [save_png(red, tmp_path / f"{i}.png") for i in range(3)]
    path = example_grid([(red, red, red), tuple(paths)], tmp_path / "grid.png")
    pixels = _png(path, (300, 150))
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 0)).sum() > 6 * 30 * 40 * 0.5
    with pytest.raises(SmoosegError, match="no examples"):
        example_grid([], tmp_path / "empty.png")


def _metrics(path, confusion=True):
    data = {"checkpoint": "runs/$weird.ckpt", "mIoU": 40.0, "Accuracy": 60.0,
            "per_class_iou": {"road": 50.0, "building": None, "vegetation": 30.0},
            "assignment": {"road": 2, "building": 0, "vegetation": 3}}
    if confusion:
        data["confusion"] = [[5, 1, 0], [0, 0, 0], [1, 9, 2], [0, 1, 7]]
    path.write_text(json.dumps(data))
    return path


def test_read_metrics_json(tmp_path):
    m = read_metrics_json(_metrics(tmp_path / "metrics.json"))
    assert m["class_names"] == NAMES and m["assignment"].tolist() == [2, 0, 3]
    assert m["iou"][0] == 50.0 and np.isnan(m["iou"][1]) and m["confusion"].shape == (4, 3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SmoosegError, match="bad.json is unreadable"):
        read_metrics_json(bad)
    bad.write_text(json.dumps({"assignment": {"a": 1, "b": 1}}))
    with pytest.raises(SmoosegError, match="distinct"):
        read_metrics_json(bad)
    with pytest.raises(SmoosegError, match="not found"):
        read_metrics_json(tmp_path / "missing.json")


def test_write_report_all_parts(tmp_path):
    json_path = _metrics(tmp_path / "metrics.json")
    rng = np.random.default_rng(0)
    for n in (0, 1, 10):
        for part in ("img", "label", "pred"):
            save_png(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), tmp_path / f"{n}_{part}.png")
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "2_img.png")   # incomplete triplet: ignored
    assert [t[0].name for t in find_examples(tmp_path)] == ["0_img.png", "1_img.png", "10_img.png"]
    written = write_report(json_path, out_dir=tmp_path / "report")
    assert set(written) == {"iou", "confusion", "examples"}
    for part, name in REPORT_FILES.items():
        assert written[part] == tmp_path / "report" / name
        _png(written[part], (200, 100))


def test_write_report_without_confusion_or_examples(tmp_path, caplog):
    json_path = _metrics(tmp_path / "metrics.json", confusion=False)
    with caplog.at_level(logging.WARNING, logger="smooseg.eval.report"):
        written = write_report(json_path)
    assert set(written) == {"iou"} and written["iou"].parent == tmp_path
    assert "no 'confusion'" in caplog.text and "examples" in caplog.text


def test_report_of_a_real_evaluation(tmp_path):
    """The JSON and pictures written by smooseg.eval.evaluate feed write_report."""
    torch.manual_seed(0)
    module = make_module(n_classes=3, dataset_name="potsdam", patch_size=16, extra_clusters=1)
    items = [{"img": torch.randn(3, 32, 32), "label": torch.randint(-1, 3, (32, 32)), "name": str(i)}
             for i in range(3)]
    out = tmp_path / "eval"
    metrics, examples = evaluate(module.net, DataLoader(items, batch_size=2), module.data, flip=True,
                                 n_images=2, device="cpu", show_progress=False)
    write_outputs(metrics, examples, module.data, module.net.n_clusters, out)
    written = write_report(out / "metrics.json")
    assert set(written) == {"iou", "confusion", "examples"}
    grid = _png(written["examples"], (200, 100))
    assert grid.shape[0] < grid.shape[1]            # two rows of three square panels


@pytest.mark.slow
def test_report_of_a_trained_checkpoint(trained_run, tmp_path):
    """eval_segmentation.py on the trained checkpoint, then the report of its output folder."""
    from conftest import run_script

    best = trained_run["best"]
    run_script("eval_segmentation.py", f"model_paths=['{best}']", f"data_dir={trained_run['data_dir']}",
               "crf=false", "n_images=3", "num_workers=0", f"output_dir={tmp_path}")
    written = write_report(next(tmp_path.glob(f"{best.stem}-*/metrics.json")))
    assert set(written) == {"iou", "confusion", "examples"}
    assert _png(written["confusion"], (400, 400)).shape[0] > 400   # 27 rows of class names
