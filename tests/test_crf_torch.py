"""The torch dense CRF (smooseg.eval.crf_torch) against pydensecrf2: lattice filter and marginals."""

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from pydensecrf import eigen

import smooseg.eval.crf_torch as crf_torch
from smooseg.data.synthetic import street_scene
from smooseg.errors import SmoosegError
from smooseg.eval.crf import dense_crf
from smooseg.eval.crf_torch import PermutohedralLattice, dense_crf_torch

MAX_ABS = 1e-3        # marginals: max |torch - pydensecrf|
MIN_AGREEMENT = 0.999  # share of pixels with the same argmax


def reference_filter(features, values):
    """pydensecrf's raw permutohedral filter of N×C ``values`` on N×d ``features``.

    One mean-field step of a CRF with a single un-normalised pairwise term of Potts weight -1
    leaves the filtered values (-w · filter(Q)) in its second scratch matrix; the scratch
    matrices are allocated at the right shape so the Python wrapper's buffer sees them.
    """
    n, c = values.shape
    crf = dcrf.DenseCRF(n, c)
    crf.setUnaryEnergy(np.zeros((c, n), np.float32))
    crf.addPairwiseEnergy(np.ascontiguousarray(features.T, dtype=np.float32), compat=-1.0,
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    q = eigen.matrixXf(np.ascontiguousarray(values.T, dtype=np.float32))
    tmp1 = eigen.matrixXf(np.zeros((c, n), np.float32))
    tmp2 = eigen.matrixXf(np.zeros((c, n), np.float32))
    crf.stepInference(q, tmp1, tmp2)
    return np.array(tmp2).T


def bilateral_features(image, sxy=67.0, srgb=3.0):
    h, w = image.shape[:2]
    pos = crf_torch._grid_features(h, w, sxy, "cpu")
    bgr = np.ascontiguousarray(image[:, :, ::-1]).reshape(-1, 3).astype(np.float32)
    colour = torch.from_numpy(bgr) / srgb
    return torch.cat([pos, colour], 1)


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def dark_image(rng, h, w):
    """Near-black colours with a grey first pixel: the vertices of the zero feature vector (the
    reference's padding of its 4-wide blocks) then neighbour the image's own."""
    image = rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
    image[0, 0] = 9
    return image


def scene(rng, h, w):
    """A street scene cropped to h×w (drawn at 32×32 at least, the smallest it lays out)."""
    return np.ascontiguousarray(street_scene(rng, (max(h, 32), max(w, 32)))[0][:h, :w])


def flat_image(rng, h, w):
    return np.full((h, w, 3), (40, 120, 200), np.uint8)


def noisy_logits(rng, labels, n_classes, size, noise=1.5):
    """Log-probs at ``size`` from a label map: one-hot × 3 plus Gaussian noise, log-softmaxed."""
    lab = torch.from_numpy(labels.astype(np.int64) % n_classes)
    onehot = torch.nn.functional.one_hot(lab, n_classes).permute(2, 0, 1).float()[None]
    small = torch.nn.functional.interpolate(onehot, size=size, mode="area")[0]
    logits = 3.0 * small + torch.from_numpy(rng.normal(0, noise, (n_classes, *size))).float()
    return torch.log_softmax(logits, 0)


def random_logits(rng, n_classes, size, scale=2.0):
    return torch.log_softmax(torch.from_numpy(rng.normal(0, scale, (n_classes, *size))).float(), 0)


# -- the lattice filter alone -------------------------------------------------------------------


@pytest.mark.parametrize("make", [random_image, dark_image, scene])
@pytest.mark.parametrize("size", [(20, 30), (1, 37), (37, 1), (13, 17), (8, 8)])
def test_lattice_filter_matches_pydensecrf(make, size):
    rng = np.random.default_rng(sum(size))
    image = make(rng, *size)
    n = size[0] * size[1]
    for features in (crf_torch._grid_features(*size, 1.0, "cpu"), bilateral_features(image)):
        lattice = PermutohedralLattice(features)
        for channels in (1, 2, 5):
            values = rng.random((n, channels)).astype(np.float32)
            ref = reference_filter(features.numpy(), values)
            out = lattice.filter(torch.from_numpy(values)).numpy()
            assert out.shape == ref.shape
            assert np.abs(out - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
        vector = rng.random(n).astype(np.float32)
        assert lattice.filter(torch.from_numpy(vector)).shape == (n,)


def test_lattice_filter_other_dimensions():
    """d = 1 and d = 3 features at other scales: the scale factors and alpha depend on d."""
    rng = np.random.default_rng(5)
    for d in (1, 3):
        features = torch.from_numpy(rng.normal(0, 4, (211, d)).astype(np.float32))
        values = rng.random((211, 3)).astype(np.float32)
        ref = reference_filter(features.numpy(), values)
        out = PermutohedralLattice(features).filter(torch.from_numpy(values)).numpy()
        assert np.abs(out - ref).max() <= 2e-6 * np.abs(ref).max()


def test_zero_padding_vertices_matter(monkeypatch):
    """The reference's 4-wide padding adds the zero feature's vertices when N % 4 != 0: on a dark
    image they carry values between the image's vertices, so leaving them out misses by ~1e-2."""
    rng = np.random.default_rng(1)
    features = bilateral_features(dark_image(rng, 1, 37))
    values = rng.random((37, 3)).astype(np.float32)
    ref = reference_filter(features.numpy(), values)
    padded = PermutohedralLattice(features)
    assert np.abs(padded.filter(torch.from_numpy(values)).numpy() - ref).max() < 2e-6
    monkeypatch.setattr(PermutohedralLattice, "_points",
                        lambda self, f: (f, torch.zeros(len(f), dtype=torch.int64)))
    unpadded = PermutohedralLattice(features)
    assert unpadded.n_vertices < padded.n_vertices
    assert np.abs(unpadded.filter(torch.from_numpy(values)).numpy() - ref).max() > 1e-3


def test_unpackable_keys_fall_back_to_row_unique(monkeypatch):
    """Keys too wide for one int64 take the row-unique path, which numbers vertices alike."""
    rng = np.random.default_rng(2)
    features = bilateral_features(scene(rng, 24, 30))
    values = torch.from_numpy(rng.random((24 * 30, 4)).astype(np.float32))
    packed = PermutohedralLattice(features, counts=[360, 360])
    monkeypatch.setattr(crf_torch, "MAX_KEY_BITS", 1)
    rows = PermutohedralLattice(features, counts=[360, 360])
    assert rows.n_vertices == packed.n_vertices
    for (rows_a, left_a, right_a), (rows_b, left_b, right_b) in zip(rows._blur_plan, packed._blur_plan,
                                                                     strict=True):
        assert (rows_a is None) == (rows_b is None) and (rows_a is None or torch.equal(rows_a, rows_b))
        assert torch.equal(left_a, left_b) and torch.equal(right_a, right_b)
    assert torch.equal(rows.filter(values), packed.filter(values))


def test_groups_do_not_mix():
    """Two identical groups in one lattice filter exactly as one group alone."""
    rng = np.random.default_rng(3)
    features = bilateral_features(scene(rng, 16, 21))
    values = torch.from_numpy(rng.random((16 * 21, 3)).astype(np.float32))
    alone = PermutohedralLattice(features).filter(values)
    joint = PermutohedralLattice(torch.cat([features, features]), counts=[336, 336])
    out = joint.filter(torch.cat([values, 2 * values]))
    assert joint.n_vertices == 2 * PermutohedralLattice(features).n_vertices
    assert torch.allclose(out[:336], alone, atol=1e-6)
    assert torch.allclose(out[336:], 2 * alone, atol=1e-6)


# -- the CRF against smooseg.eval.crf.dense_crf ----------------------------------------------------


def parity(image, log_probs, **params):
    ref = dense_crf(image, log_probs, **params)
    out = dense_crf_torch(image, log_probs, **params)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == ref.shape
    out = out.numpy()
    return float(np.abs(out - ref).max()), float((out.argmax(0) == ref.argmax(0)).mean())


CASES = {
    "random 20x30 K=3": (random_image, (20, 30), 3, (5, 8)),
    "random 1x37 K=3": (random_image, (1, 37), 3, (1, 10)),
    "random 37x1 K=27": (random_image, (37, 1), 27, (10, 1)),
    "single colour 33x47 K=27": (flat_image, (33, 47), 27, (9, 12)),
    "dark 23x29 K=3": (dark_image, (23, 29), 3, (6, 8)),
    "random 41x23 K=27": (random_image, (41, 23), 27, (41, 23)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_marginals_match_dense_crf_random(name):
    make, size, n_classes, lp_size = CASES[name]
    rng = np.random.default_rng(len(name))
    max_abs, agreement = parity(make(rng, *size), random_logits(rng, n_classes, lp_size))
    assert max_abs <= MAX_ABS and agreement >= MIN_AGREEMENT, (name, max_abs, agreement)


@pytest.mark.parametrize("size,n_classes", [((48, 64), 27), ((45, 70), 3), ((61, 40), 6)])
def test_marginals_match_dense_crf_scenes(size, n_classes):
    """Synthetic street scenes (smooth regions and texture) with noisy low-resolution logits."""
    rng = np.random.default_rng(size[0])
    image, labels = street_scene(rng, size)
    log_probs = noisy_logits(rng, labels, n_classes, (size[0] // 4, size[1] // 4))
    max_abs, agreement = parity(image, log_probs)
    assert max_abs <= MAX_ABS and agreement >= MIN_AGREEMENT, (size, max_abs, agreement)


def test_marginals_match_dense_crf_320_k27():
    """The realistic size: a 320×320 street scene, 27 classes, logits at 1/4 resolution."""
    rng = np.random.default_rng(320)
    image, labels = street_scene(rng, (320, 320))
    max_abs, agreement = parity(image, noisy_logits(rng, labels, 27, (80, 80)))
    assert max_abs <= MAX_ABS and agreement >= MIN_AGREEMENT, (max_abs, agreement)


def test_marginals_match_dense_crf_other_parameters():
    rng = np.random.default_rng(9)
    image, labels = street_scene(rng, (40, 52))
    log_probs = noisy_logits(rng, labels, 5, (10, 13))
    for params in ({"iters": 3, "gaussian_sxy": 3, "gaussian_compat": 5, "bilateral_sxy": 20,
                    "bilateral_srgb": 13, "bilateral_compat": 10},
                   {"iters": 5, "bilateral_compat": 0}, {"iters": 0}, {"iters": 1, "gaussian_compat": 0}):
        max_abs, agreement = parity(image, log_probs, **params)
        assert max_abs <= MAX_ABS and agreement >= MIN_AGREEMENT, (params, max_abs, agreement)


# -- properties -------------------------------------------------------------------------------


def test_marginals_are_distributions_and_deterministic():
    rng = np.random.default_rng(11)
    image, labels = street_scene(rng, (36, 50))
    log_probs = noisy_logits(rng, labels, 7, (9, 12))
    first = dense_crf_torch(image, log_probs)
    assert tuple(first.shape) == (7, 36, 50)
    assert torch.isfinite(first).all() and (first >= 0).all()
    assert torch.allclose(first.sum(0), torch.ones(36, 50), atol=1e-5)
    assert torch.equal(first, dense_crf_torch(image, log_probs))


def test_batch_equals_images_one_by_one():
    """Three similar scenes in one batch (a joint bilateral lattice) equal three single runs."""
    rng = np.random.default_rng(12)
    base, labels = street_scene(rng, (30, 35))
    noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    images = np.stack([base, noisy, dark_image(rng, 30, 35)])
    log_probs = torch.stack([noisy_logits(rng, labels, 4, (8, 9)) for _ in range(3)])
    batch = dense_crf_torch(torch.from_numpy(images), log_probs)
    assert tuple(batch.shape) == (3, 4, 30, 35)
    for i in range(3):
        single = dense_crf_torch(images[i], log_probs[i])
        assert torch.allclose(batch[i], single, atol=1e-6, rtol=0), i


def test_inputs_numpy_float64_and_full_resolution():
    rng = np.random.default_rng(13)
    image = random_image(rng, 12, 14)
    log_probs = rng.normal(0, 2, (3, 12, 14))  # float64 numpy at full resolution
    out = dense_crf_torch(image, log_probs)
    ref = dense_crf(image, log_probs)
    assert np.abs(out.numpy() - ref).max() <= MAX_ABS


def test_iters_zero_is_the_clipped_softmax():
    rng = np.random.default_rng(14)
    log_probs = random_logits(rng, 4, (6, 6), scale=8.0)
    out = dense_crf_torch(random_image(rng, 6, 6), log_probs, iters=0)
    expected = torch.softmax(torch.log(torch.softmax(log_probs, 0).clamp(1e-5, 1.0)), 0)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(15)
    image, labels = street_scene(rng, (64, 80))
    log_probs = noisy_logits(rng, labels, 27, (16, 20))
    cpu = dense_crf_torch(image, log_probs)
    gpu = dense_crf_torch(torch.from_numpy(image).cuda(), log_probs.cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() <= 1e-4
    again = dense_crf_torch(torch.from_numpy(image).cuda(), log_probs.cuda())
    assert (again - gpu).abs().max() <= 1e-5  # cuSPARSE may sum in another order run to run


# -- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("images,log_probs,match", [
    (np.zeros((3, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), np.zeros((2, 8, 8), np.float32), "uint8 B×H×W×3"),
    (np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8), np.float32), "uint8 B×H×W×3"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((1, 2, 8, 8), np.float32), "K×h×w"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.float32), "B×K×h×w"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.int64), "float"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 2, 8, 8), np.float32), "2 images but 3"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 8), np.float32), "empty"),
    ([[1, 2, 3]], np.zeros((2, 8, 8), np.float32), "tensor or numpy"),
])
def test_bad_inputs_raise(images, log_probs, match):
    with pytest.raises(SmoosegError, match=match):
        dense_crf_torch(images, log_probs)


@pytest.mark.parametrize("params,match", [
    ({"iters": -1}, "iters"), ({"iters": 2.5}, "iters"), ({"gaussian_sxy": 0}, "gaussian_sxy"),
    ({"bilateral_srgb": float("nan")}, "bilateral_srgb"), ({"bilateral_compat": "4"}, "bilateral_compat"),
])
def test_bad_parameters_raise(params, match):
    with pytest.raises(SmoosegError, match=match):
        dense_crf_torch(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.float32), **params)


def test_bad_lattice_inputs_raise():
    with pytest.raises(SmoosegError, match="N×d float tensor"):
        PermutohedralLattice(torch.zeros(5, dtype=torch.float32))
    with pytest.raises(SmoosegError, match="N×d float tensor"):
        PermutohedralLattice(torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(SmoosegError, match="finite"):
        PermutohedralLattice(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(SmoosegError, match="add up to the 4 points"):
        PermutohedralLattice(torch.zeros(4, 2), counts=[2, 3])
    lattice = PermutohedralLattice(torch.zeros(4, 2))
    with pytest.raises(SmoosegError, match="4 values"):
        lattice.filter(torch.zeros(5, 3))


def test_benchmark_script_runs(tmp_path):
    """``python -m benchmarks.crf_bench`` at a tiny size (no timing asserted), so it cannot rot."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "crf.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.crf_bench", "--size", "32", "40",
                           "--classes", "3", "--images", "1", "--iters", "2", "--device", "cpu",
                           "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pydensecrf" in proc.stdout and "torch cpu" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"scene", "noise"}
    for row in rows:
        assert row["ms_per_image"] > 0 and row["peak_mem_mb"] > 0
        if row["run"] != "pydensecrf":
            assert row["max_abs_diff"] <= MAX_ABS and row["argmax_agreement"] >= MIN_AGREEMENT
            assert row["lattice_share"] > 0 and row["grid_lattice_ms"] > 0


def test_backend_choice_and_the_pool_interface():
    from smooseg.eval.crf_backend import TorchCRF, open_crf, resolve_backend
    from smooseg.eval.crf_pool import CRFPool

    assert resolve_backend("auto", "cpu") == "pydensecrf" and resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(SmoosegError, match="crf_backend=gpu is unknown"):
        resolve_backend("gpu", "cpu")
    assert isinstance(open_crf("auto", "cpu"), CRFPool) and isinstance(open_crf("torch", "cpu"), TorchCRF)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    log_probs = [torch.log_softmax(torch.randn(4, 5, 8), 0) for _ in range(2)]
    with TorchCRF("cpu") as crf, CRFPool(0) as pool:
        handle = crf.submit(images, log_probs, labels=True)
        assert handle.done() and crf.busy_workers() == 0
        ours, theirs = handle.result(), pool.submit(images, log_probs, labels=True).result()
        marginals = crf.submit(images[:1], log_probs[:1]).result()
    assert [a.dtype for a in ours] == [np.int16, np.int16] and ours[0].shape == (20, 30)
    assert all((a == b).mean() >= 0.999 for a, b in zip(ours, theirs, strict=True))
    np.testing.assert_allclose(marginals[0], dense_crf(images[0], log_probs[0]), atol=1e-3)
    mixed = crf.submit([images[0], images[1][:10]], [log_probs[0], log_probs[1]]).result()  # two sizes
    assert mixed[1].shape == (4, 10, 30)
