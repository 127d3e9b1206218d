import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import save_spread_checkpoint
from smooseg.data.datasets import DatasetInfo
from smooseg.errors import SmoosegError
from smooseg.eval.crf_backend import open_crf
from smooseg.eval.crf_memory import (
    crf_bytes_per_pixel,
    crf_shape,
    host_available_memory,
    parse_bytes,
)
from smooseg.eval.predict import (
    PredictOptions,
    bilinear_matrix,
    log_prob_stripes,
    predict_resize,
    predict_window,
    resized_shape,
    upsampled_argmax,
    window_starts,
)
from smooseg.eval.segment import (
    class_map_from_metrics,
    list_images,
    output_stems,
    read_image,
    run_segment,
    segment_folder,
)
from smooseg.model.backbone import patch_multiple
from smooseg.model.checkpoints import load_net
from smooseg.viz import class_colors, colormap, legend_image

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES, EXTRA = 3, 1
K = N_CLASSES + EXTRA


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init ViT-S/16 SmooSeg model (3 classes + 1 extra cluster) saved in the native layout."""
    return save_spread_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", N_CLASSES, EXTRA)


@pytest.fixture(scope="module")
def module(checkpoint):
    return load_net(checkpoint)[0]


@pytest.fixture(scope="module")
def data(checkpoint):
    return DatasetInfo(**load_net(checkpoint)[1]["data"])


def _write(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = rng.integers(0, 255, 3)
    img[:, w // 2:] = rng.integers(0, 255, 3)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "in"
    _write(root / "a.png", 50, 70, 0)
    _write(root / "b.jpg", 97, 64, 1)
    _write(root / "nested" / "deep" / "c.bmp", 40, 33, 2)
    (root / "notes.txt").write_text("not an image")
    _write(root / ".hidden.png", 20, 20, 3)
    return root


# ---- pure helpers ----
def test_window_starts_by_hand():
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(64, 32, 16) == [0, 16, 32]
    assert window_starts(32, 32, 16) == [0]
    assert window_starts(20, 32, 16) == [0]
    assert window_starts(40, 32, 100) == [0, 8]


def test_patch_multiple_and_resized_shape():
    assert [patch_multiple(n, 16) for n in (1, 7, 8, 23, 24, 320)] == [16, 16, 16, 16, 32, 320]
    assert patch_multiple(320, 14) == 322
    assert resized_shape(50, 70, 64, 16) == (64, 96)       # 70 * 1.28 = 89.6 -> 96
    assert resized_shape(97, 64, 64, 16) == (96, 64)       # 97 * 1.0 -> 96


@pytest.mark.parametrize("out_len, in_len", [(50, 4), (97, 6), (9, 2), (7, 7), (3, 10)])
def test_bilinear_matrix_matches_interpolate(out_len, in_len):
    x = torch.randn(2, 3, in_len, 5)
    ref = F.interpolate(x, size=(out_len, 5), mode="bilinear", align_corners=False)
    assert torch.allclose(bilinear_matrix(out_len, in_len) @ x, ref, atol=1e-5)
    assert torch.allclose(bilinear_matrix(out_len, in_len).sum(1), torch.ones(out_len))


def test_stripes_equal_cluster_log_probs(module):
    """Stripe-wise upsampling of the (flip-averaged) code gives the model's own log-probabilities."""
    img = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = module(img, size=(37, 53), flip=True)
        code = module.predict_code(img, flip=True)
        stripes = list(log_prob_stripes(module, code, (37, 53), max_elements=64 * 53 * 5))
    assert len(stripes) == 8 and stripes[0][:2] == (0, 5) and stripes[-1][:2] == (35, 37)
    assert torch.allclose(torch.cat([s for _, _, s in stripes], dim=2), ref, atol=1e-5)


class _WindowMean:
    """Fake model: each window gets p(cluster 0) = its mean of channel 0, uniformly over the window."""

    patch_size = 8
    n_clusters = 2

    def __call__(self, batch, flip=False):
        p0 = batch[:, 0].mean(dim=(1, 2)).view(-1, 1, 1).expand(-1, *batch.shape[-2:])
        return torch.stack([p0, 1 - p0], dim=1).log()


def test_window_probabilities_averaged_over_overlaps():
    # 1×64 ramp in 8-pixel steps of channel 0; windows of 32 every 16 px: [0,32) [16,48) [32,64)
    steps = torch.arange(8, dtype=torch.float32).repeat_interleave(8) / 10
    img = torch.zeros(1, 3, 8, 64)
    img[0, 0] = steps
    ids, log_probs = predict_window(_WindowMean(), img, 32, 16, keep_log_probs=True)
    means = [steps[a:a + 32].mean().item() for a in (0, 16, 32)]
    expected = np.array([means[0]] * 16 + [(means[0] + means[1]) / 2] * 16
                        + [(means[1] + means[2]) / 2] * 16 + [means[2]] * 16)
    assert np.allclose(np.exp(log_probs[0, 3]), expected, atol=1e-6)
    assert np.allclose(np.exp(log_probs).sum(0), 1, atol=1e-6)
    assert (ids == (expected < 0.5).astype(int)).all()


def test_window_pads_small_image_and_crops_back():
    img = torch.rand(1, 3, 10, 13)
    ids, log_probs = predict_window(_WindowMean(), img, 32, 16, keep_log_probs=True)
    assert ids.shape == (10, 13) and log_probs.shape == (2, 10, 13)
    # one 16×16 window, zero-padded: its channel-0 mean includes the padding
    assert np.allclose(np.exp(log_probs[0]), img[0, 0].sum().item() / 256, atol=1e-6)


def test_resize_mode_predicts_at_original_size(module):
    img = torch.randn(1, 3, 50, 70)
    ids, log_probs = predict_resize(module, img, 64, flip=False, keep_log_probs=True)
    assert ids.shape == (50, 70) and log_probs.shape == (K, 50, 70)
    net_in = F.interpolate(img, size=(64, 96), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        ref = module(net_in, size=(50, 70))
    assert np.allclose(log_probs, ref[0].numpy(), atol=1e-5)
    assert (ids == log_probs.argmax(0)).all()


def test_list_images_sorted_filtered_and_stems(folder, tmp_path):
    assert [p.name for p in list_images(folder)] == ["a.png", "b.jpg"]
    found = list_images(folder, recursive=True)
    assert [p.relative_to(folder).as_posix() for p in found] == ["a.png", "b.jpg", "nested/deep/c.bmp"]
    assert [s.as_posix() for s in output_stems(found, folder)] == ["a", "b", "nested/deep/c"]
    _write(folder / "a.jpg", 8, 8, 4)
    found = list_images(folder)
    assert [s.as_posix() for s in output_stems(found, folder)] == ["a_jpg", "a_png", "b"]
    assert [p.name for p in list_images(folder, recursive=True, exclude=folder / "nested")] == \
        ["a.jpg", "a.png", "b.jpg"]


def test_empty_missing_and_unreadable(tmp_path, module, data):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SmoosegError, match="holds no images.*recursive=true"):
        list_images(tmp_path / "empty")
    with pytest.raises(SmoosegError, match="is not a folder"):
        list_images(tmp_path / "nope")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SmoosegError, match=r"cannot read image .*bad\.jpg") as err:
        read_image(bad)
    assert "\n" not in str(err.value)


# ---- segment_folder ----
def _read(path):
    return np.asarray(Image.open(path))


def test_segment_folder_resize_recursive(folder, tmp_path, module, data):
    out = tmp_path / "out"
    results = segment_folder(module, data, folder, out, PredictOptions(mode="resize", size=64),
                             recursive=True, save_ids=True, show_progress=False)
    assert len(results) == 3
    palette = colormap("potsdam", K)
    for rel, (h, w) in [("a", (50, 70)), ("b", (97, 64)), ("nested/deep/c", (40, 33))]:
        ids = _read(out / f"{rel}_ids.png")
        mask = _read(out / f"{rel}_mask.png")
        over = _read(out / f"{rel}_overlay.png")
        assert ids.shape == (h, w) and ids.dtype == np.uint8 and ids.max() < K
        assert mask.shape == over.shape == (h, w, 3)
        assert (mask == palette[ids]).all()
        image = read_image(next(folder.glob(f"{rel}.*")))
        blend = (0.5 * image.astype(np.float32) + 0.5 * mask.astype(np.float32)).round()
        assert np.abs(over.astype(np.float32) - blend).max() <= 1
    rels = ("a", "b", "nested/deep/c")
    present = np.unique(np.concatenate([_read(out / f"{rel}_ids.png").ravel() for rel in rels]))
    legend_colours = {tuple(c) for c in _read(out / "legend.png").reshape(-1, 3)}
    assert all(tuple(palette[k]) in legend_colours for k in present)
    assert not any(tuple(palette[k]) in legend_colours for k in set(range(K)) - set(present.tolist()))
    assert not any(p.name.startswith(".") for p in out.rglob("*"))


def test_segment_folder_window_class_map_and_legend(folder, tmp_path, module, data):
    out = tmp_path / "out"
    class_map = torch.tensor([2, -1, 0, 1])         # cluster 1 is unmatched
    options = PredictOptions(mode="window", size=32, stride=16, flip=False)
    results = segment_folder(module, data, folder, out, options, save_ids=True, class_map=class_map,
                             show_progress=False)
    assert [r["image"].name for r in results] == ["a.png", "b.jpg"]
    palette = colormap("potsdam", K)
    colour_of_cluster = np.stack([palette[2], palette[3], palette[0], palette[1]])
    for rel, (h, w) in [("a", (50, 70)), ("b", (97, 64))]:
        ids, mask = _read(out / f"{rel}_ids.png"), _read(out / f"{rel}_mask.png")
        assert ids.shape == (h, w) and ids.max() < K
        assert (mask == colour_of_cluster[ids]).all()
    present = np.unique(np.concatenate([_read(out / f"{rel}_ids.png").ravel() for rel in ("a", "b")]))
    legend = _read(out / "legend.png")
    assert legend.ndim == 3 and legend.shape[0] >= len(present) * 20 and legend.shape[1] > 60
    colours_in_legend = {tuple(c) for c in legend.reshape(-1, 3)}
    assert {k for k in range(K) if tuple(colour_of_cluster[k]) in colours_in_legend} == set(present.tolist())


def test_segment_folder_crf_and_skip_bad(folder, tmp_path, module, data, caplog):
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(SmoosegError, match="zz_broken.png"):
        segment_folder(module, data, folder, tmp_path / "o1", show_progress=False)
    with caplog.at_level(logging.WARNING, logger="smooseg.eval.segment"), \
            open_crf("pydensecrf", "cpu") as crf:
        results = segment_folder(module, data, folder, tmp_path / "o2", PredictOptions(size=32),
                                 crf_pool=crf, save_ids=True, skip_bad=True, show_progress=False)
    assert [r["image"].name for r in results] == ["a.png", "b.jpg"]
    assert "zz_broken.png" in caplog.text
    assert _read(tmp_path / "o2" / "b_ids.png").shape == (97, 64)
    assert not (tmp_path / "o2" / "zz_broken_mask.png").exists()


def test_segment_folder_rejects_bad_options(folder, tmp_path, module, data):
    with pytest.raises(SmoosegError, match="mode=tile"):
        segment_folder(module, data, folder, tmp_path / "o", PredictOptions(mode="tile"), show_progress=False)
    with pytest.raises(SmoosegError, match="stride=40 is larger than the window"):
        segment_folder(module, data, folder, tmp_path / "o",
                       PredictOptions(mode="window", size=32, stride=40), show_progress=False)
    with pytest.raises(SmoosegError, match="input folder"):
        segment_folder(module, data, folder, folder, show_progress=False)
    with pytest.raises(SmoosegError, match="class_map"):
        segment_folder(module, data, folder, tmp_path / "o", class_map=[0, 1], show_progress=False)


def test_output_inside_input_is_not_resegmented(folder, module, data):
    out = folder / "seg"
    segment_folder(module, data, folder, out, PredictOptions(size=32), recursive=True, show_progress=False)
    again = segment_folder(module, data, folder, out, PredictOptions(size=32), recursive=True,
                           show_progress=False)
    assert len(again) == 3


def test_class_colors_and_legend_image():
    palette = colormap("potsdam", 5)
    colours = class_colors([1, -1, 0, -1, 2], palette)
    assert [tuple(c) for c in colours] == [tuple(palette[i]) for i in (1, 3, 0, 4, 2)]
    legend = legend_image(["road", "tree"], [(255, 0, 0), (0, 0, 255)])
    assert legend.dtype == np.uint8 and legend.shape[0] > 40
    pixels = {tuple(c) for c in legend.reshape(-1, 3)}
    assert (255, 0, 0) in pixels and (0, 0, 255) in pixels


def _metrics_json(path, assignment):
    names = ["roads", "buildings", "trees"]
    data = {"mIoU": 10.0, "Accuracy": 20.0, "per_class_iou": dict(zip(names, [1.0, None, 3.0], strict=True)),
            "assignment": dict(zip(names, assignment, strict=True))}
    path.write_text(json.dumps(data))
    return path


def test_class_map_from_metrics(tmp_path):
    path = _metrics_json(tmp_path / "m.json", [2, 3, 0])
    class_map, names = class_map_from_metrics(path, n_clusters=4, n_classes=3)
    assert class_map.tolist() == [2, -1, 0, 1] and names == ["roads", "buildings", "trees"]
    with pytest.raises(SmoosegError, match="3 classes but the model 5"):
        class_map_from_metrics(path, n_clusters=6, n_classes=5)
    with pytest.raises(SmoosegError, match="assigns cluster 3"):
        class_map_from_metrics(path, n_clusters=3, n_classes=3)


# ---- entry point ----
def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "segment_images.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_entry_point_bad_folder_exits_2(tmp_path, checkpoint, entry_point):
    proc = entry_point("segment_images.py", f"model_path={checkpoint}", f"input_dir={tmp_path / 'missing'}",
                       cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: input_dir {tmp_path / 'missing'} is not a folder; pass input_dir=<folder of images>"]


def test_entry_point_segments_with_metrics_json(folder, tmp_path, checkpoint):
    metrics = _metrics_json(tmp_path / "metrics.json", [1, 0, 3])
    proc = _run(f"model_path={checkpoint}", f"input_dir={folder}", "output_dir=seg", "--recursive",
                "--mode", "window", "size=32", "save_ids=true", f"metrics_json={metrics}",
                "progress=false", "device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "seg"
    assert _read(out / "nested" / "deep" / "c_mask.png").shape == (40, 33, 3)
    assert _read(out / "b_ids.png").shape == (97, 64)
    assert (out / "legend.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "metrics.json", "seg"]  # no Hydra litter


@pytest.mark.slow
def test_trained_checkpoint_with_its_evaluation(trained_run, tmp_path):
    """Trained checkpoint + its evaluation's metrics.json: class colours, legend, mirrored cities."""
    from conftest import run_script

    best, data_dir = trained_run["best"], trained_run["data_dir"]
    run_script("eval_segmentation.py", f"model_paths=['{best}']", f"data_dir={data_dir}", "crf=false",
               "n_images=0", "num_workers=0", f"output_dir={tmp_path / 'eval'}")
    metrics, = (tmp_path / "eval").glob(f"{best.stem}-*/metrics.json")
    images = data_dir / "cityscapes" / "leftImg8bit" / "val"
    run_script("segment_images.py", f"model_path='{best}'", f"input_dir={images}",
               f"output_dir={tmp_path / 'seg'}", "recursive=true", "size=64", "save_ids=true",
               f"metrics_json='{metrics}'", "progress=false", "device=cpu")
    sources = list_images(images, recursive=True)
    class_map, _ = class_map_from_metrics(metrics, n_clusters=27, n_classes=27)
    colours = colormap("cityscapes", 27)[class_map.numpy()]
    for src, stem in zip(sources, output_stems(sources, images), strict=True):
        ids = _read(tmp_path / "seg" / f"{stem}_ids.png")
        assert ids.shape == read_image(src).shape[:2]
        assert (_read(tmp_path / "seg" / f"{stem}_mask.png") == colours[ids]).all()
    assert (tmp_path / "seg" / "legend.png").is_file()


def test_entry_point_crf_backends_agree(folder, tmp_path, checkpoint, entry_point):
    """segment_images.py crf=true with the torch CRF and with pydensecrf: the same ids (almost)."""
    ids = {}
    for backend in ("pydensecrf", "torch"):
        proc = _run(f"model_path={checkpoint}", f"input_dir={folder}", f"output_dir={backend}", "size=32",
                    "crf=true", f"crf_backend={backend}", "save_ids=true", "progress=false", "device=cpu",
                    cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        ids[backend] = _read(tmp_path / backend / "b_ids.png")
    assert ids["torch"].shape == (97, 64)
    assert (ids["torch"] == ids["pydensecrf"]).mean() >= 0.999
    bad = entry_point("segment_images.py", f"model_path={checkpoint}", f"input_dir={folder}", "crf=true",
                      "crf_backend=opencl", "progress=false", cwd=tmp_path)
    assert bad.returncode == 2
    assert ("crf_backend=opencl is not allowed: crf_backend must be one of auto, pydensecrf, torch"
            in bad.stderr)


# ---- the CRF's memory: bounded resolution, estimated and refused before starting

def test_crf_shape_keeps_the_aspect_within_the_bound():
    assert crf_shape(30, 40, 2000) == (30, 40)
    h, w = crf_shape(3000, 4000, 4_000_000)
    assert h * w <= 4_000_000 and (h, w) == (1732, 2309)
    h, w = crf_shape(90, 120, 2000)
    assert h * w <= 2000 and abs(w / h - 120 / 90) < 0.05
    assert crf_shape(1, 10_000, 10) == (1, 10)


@pytest.mark.parametrize("max_elements", [1 << 24, 3 * 40])
def test_upsampled_argmax_is_the_argmax_of_the_bilinear_upsampling(max_elements):
    probs = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(probs[None], size=(40, 50), mode="bilinear", align_corners=False)[0].argmax(0)
    got = upsampled_argmax(probs.numpy(), (40, 50), max_elements=max_elements)
    assert got.shape == (40, 50) and (got == expected.numpy()).mean() > 0.999   # ties aside


def test_parse_bytes_and_host_memory():
    assert parse_bytes("auto") is None and parse_bytes(None) is None
    assert parse_bytes(1000) == 1000 and parse_bytes("8GB") == 8 * 2**30
    assert parse_bytes("512mb") == 512 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("2G") == 2 * 2**30
    for bad in ("lots", "-1GB", "0", True):
        with pytest.raises(SmoosegError, match="crf_max_memory=.* is not a memory size"):
            parse_bytes(bad)
    if Path("/proc/meminfo").is_file():
        assert host_available_memory() > 0


class RecordingCRF:
    """The in-process pydensecrf pool, recording what it is asked to refine."""

    def __init__(self):
        from smooseg.eval.crf_pool import CRFPool

        self.pool, self.shapes = CRFPool(0), []
        self.num_workers, self.max_in_flight = 0, 4

    def submit(self, images, log_probs, labels=False):
        self.shapes += [(np.asarray(i).shape[:2], np.asarray(lp).shape)
                        for i, lp in zip(images, log_probs, strict=True)]
        return self.pool.submit(images, log_probs, labels)

    def close(self):
        self.pool.close()


def test_crf_of_a_large_image_runs_at_crf_max_pixels(tmp_path, module, data):
    from smooseg.eval.crf import dense_crf
    from smooseg.eval.predict import to_input

    _write(tmp_path / "in" / "big.png", 90, 120, 5)
    crf = RecordingCRF()
    segment_folder(module, data, tmp_path / "in", tmp_path / "out", PredictOptions(size=32), crf_pool=crf,
                   save_ids=True, show_progress=False, crf_max_pixels=2000)
    (image_shape, lp_shape), = crf.shapes
    assert image_shape == crf_shape(90, 120, 2000) and lp_shape == (K, *image_shape)
    assert image_shape[0] * image_shape[1] <= 2000
    ids = _read(tmp_path / "out" / "big_ids.png")
    assert ids.shape == (90, 120)
    # by hand: log-probs and image at the CRF size, the CRF, the upsampled argmax
    image = read_image(tmp_path / "in" / "big.png")
    _, log_probs = predict_resize(module, to_input(image, "cpu"), 32, keep_log_probs=True,
                                  log_size=image_shape)
    small = np.asarray(Image.fromarray(image).resize(image_shape[::-1], Image.BILINEAR))
    expected = upsampled_argmax(dense_crf(small, log_probs), (90, 120))
    assert (ids == expected).all()


def test_entry_point_refuses_a_crf_that_cannot_fit_and_names_the_fix(tmp_path, checkpoint, entry_point):
    photos = tmp_path / "photos"
    _write(photos / "small.png", 40, 60, 0)
    _write(photos / "large.png", 300, 400, 1)
    args = [f"model_path={checkpoint}", f"input_dir={photos}", "output_dir=out", "size=32", "crf=true",
            "save_ids=true", "progress=false", "device=cpu"]
    proc = entry_point("segment_images.py", *args, "crf_max_memory=50MB", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    need = crf_bytes_per_pixel("pydensecrf", K) * 300 * 400
    assert lines[0] == (
        f"error: the dense CRF of {photos / 'large.png'} (400x300 px) needs about {need / 2**20:.0f} MB with "
        f"the pydensecrf CRF at {K} clusters, but crf_max_memory=50MB allows 50 MB; lower crf_max_pixels "
        "(e.g. crf_max_pixels=40000), or set crf=false")
    assert not (tmp_path / "out").exists()                 # refused before anything was written
    proc = _run(*args, "crf_max_memory=50MB", "crf_max_pixels=40000", cwd=tmp_path)   # the fix it names
    assert proc.returncode == 0, proc.stderr
    assert _read(tmp_path / "out" / "large_ids.png").shape == (300, 400)


def test_recursive_names_the_symlinked_folders_it_skips(tmp_path, module, data, caplog):
    root = tmp_path / "in"
    _write(root / "a.png", 20, 30, 0)
    _write(tmp_path / "elsewhere" / "b.png", 20, 30, 1)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="smooseg.eval.segment"):
        found = list_images(root, recursive=True)
    assert [p.name for p in found] == ["a.png"]
    assert f"skipped symlinked folder {root / 'linked'}" in caplog.text


def test_metrics_json_of_another_checkpoint_is_refused(tmp_path, checkpoint, folder, entry_point):
    from smooseg.eval.provenance import file_sha256

    own = _metrics_json(tmp_path / "own.json", [1, 0, 3])
    data = json.loads(own.read_text())
    data["provenance"] = {"checkpoint": {"sha256": file_sha256(checkpoint)}}
    own.write_text(json.dumps(data))
    class_map, _ = class_map_from_metrics(own, 4, 3, checkpoint_sha256=file_sha256(checkpoint))
    assert class_map.tolist() == [1, 0, -1, 2]
    data["provenance"]["checkpoint"]["sha256"] = "ab" * 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    proc = entry_point("segment_images.py", f"model_path={checkpoint}", f"input_dir={folder}",
                       "output_dir=seg", f"metrics_json={other}", "progress=false", "device=cpu",
                       cwd=tmp_path)
    assert proc.returncode == 2
    assert "is the evaluation of another checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "seg").exists()


def test_run_segment_reads_attributes_only(tmp_path, checkpoint):
    """run_segment takes any object with the keys of segment.yaml as attributes (the typed settings)."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        cfg = compose(config_name="segment", overrides=[f"model_path={checkpoint}"])
    keys = {k: cfg[k] for k in cfg if k not in ("hydra", "defaults", "input_dir")}
    _write(tmp_path / "in" / "a.png", 30, 41, 0)
    keys.update(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), size=32, progress=False,
                device="cpu", save_ids=True)
    settings = dataclasses.make_dataclass("SegmentSettings", list(keys))(**keys)
    (result,) = run_segment(settings)
    assert _read(result["ids"]).shape == (30, 41)
    assert result["side"].name == "a_side.png" and result["side"].is_file()
    missing = dataclasses.replace(settings, model_path=None)
    with pytest.raises(SmoosegError, match="model_path is required"):
        run_segment(missing)
