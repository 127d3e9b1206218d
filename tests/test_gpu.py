"""CUDA correctness: ``pytest -m gpu`` (every test here is skipped without a CUDA GPU).

What the CPU suite shows on the CPU, on the GPU: training through ``train(cfg)`` (the entry
point's function, composed with Hydra as conftest does) in 32-true, 16-mixed and bf16-mixed;
eager against ``perf.compile=true``; the feature cache against the backbone; evaluation on the
GPU against evaluation on the CPU through ``eval_segmentation.py``; the torch CRF on CUDA against
pydensecrf; resuming on the GPU.  ``python -m benchmarks.gpu_check`` runs this file and reports
each test's outcome; every tolerance assertion names the value it measured.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from conftest import run_script, train_settings
from smooseg.data.synthetic import write_cityscapes_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RES = 64  # ViT-S/16: a 4x4 patch grid
STEPS = 6
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
OVERRIDES = ["experiment=demo", "model=dino_vits16", "model.pretrained=false", "trainer=gpu", f"res={RES}",
             f"eval_res={RES}", "batch_size=4", "num_workers=0", "logger=none", "seed=0",
             f"max_steps={STEPS}", f"val_check_interval={STEPS}", "trainer.enable_progress_bar=false",
             "+trainer.enable_model_summary=false"]


class Recorder(Callback):
    """What a fit did: the step it started at, each training loss, the device and precision, the
    teacher prototypes at the start and the backbone calls made inside training steps."""

    def __init__(self):
        self.start, self.losses, self.device, self.precision = None, [], None, None
        self.teacher0, self.backbone_calls, self._in_step, self._hook = None, 0, False, None

    def on_train_start(self, trainer, pl_module):
        self.start, self.device = trainer.global_step, pl_module.device.type
        self.precision = str(trainer.precision)
        self.teacher0 = pl_module.net.predictor.teacher.detach().float().cpu().clone()
        self._hook = pl_module.net.backbone.register_forward_hook(self._count)

    def _count(self, *_):
        self.backbone_calls += self._in_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._in_step = False
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()


def fit(data, out, *extra):
    """train(settings) of the demo preset on the GPU; returns (Recorder, last.ckpt contents, train's
    result)."""
    from smooseg.train.train import train

    recorder = Recorder()
    cfg = train_settings(OVERRIDES + [f"data_dir={data}", f"output_dir={out}", *extra])
    result = train(cfg, callbacks=[recorder])
    last = torch.load(Path(out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return recorder, last, result


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    return write_cityscapes_layout(tmp_path_factory.mktemp("gpu_data"), n_train=8, n_val=4,
                                   size=(RES, 2 * RES), seed=0)


@pytest.fixture(scope="module")
def trained(gpu_data, tmp_path_factory):
    """``trained(precision)``: one training run per precision, shared by the tests (the error of a
    failed run is raised again for each test that asks for it)."""
    runs = {}

    def get(precision):
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"train_{precision}")
            try:
                recorder, last, result = fit(gpu_data, out, f"trainer.precision={precision}")
                runs[precision] = {"recorder": recorder, "last_ckpt": last, "result": result,
                                   "output_dir": out}
            except Exception as err:  # noqa: BLE001
                runs[precision] = err
        if isinstance(runs[precision], Exception):
            raise runs[precision]
        return runs[precision]

    return get


# ---- training in each precision --------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_on_cuda(trained, precision):
    run = trained(precision)
    rec, last = run["recorder"], run["last_ckpt"]
    assert rec.device == "cuda" and rec.precision == precision, (rec.device, rec.precision)
    assert rec.start == 0 and len(rec.losses) == STEPS
    assert np.isfinite(rec.losses).all(), rec.losses
    assert rec.backbone_calls == STEPS  # the backbone ran once per step, on the GPU
    assert last["global_step"] == STEPS
    assert run["result"]["best"] and Path(run["result"]["best"]).is_file()
    teacher = last["state_dict"]["net.predictor.teacher"].float()
    student = last["state_dict"]["net.predictor.student"]
    assert torch.isfinite(teacher).all() and torch.isfinite(student).all()
    moved = float((teacher - rec.teacher0).abs().max())
    assert moved > 0, "the teacher EMA did not move"
    assert not torch.equal(teacher, student.float())


def test_precisions_agree_on_the_first_steps(trained):
    """Same seed, weights and batches: the mixed-precision losses stay near the float32 ones."""
    ref = np.array(trained("32-true")["recorder"].losses)
    for precision in ("16-mixed", "bf16-mixed"):
        losses = np.array(trained(precision)["recorder"].losses)
        diff = float(np.abs(losses[:2] - ref[:2]).max())
        assert diff <= 0.1 * float(np.abs(ref[:2]).max()) + 0.02, (precision, diff, losses.tolist(),
                                                                    ref.tolist())


# ---- feature cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,dtype,atol",
                         [("32-true", "float32", 1e-4), ("bf16-mixed", "float16", 2e-2)])
def test_cached_training_matches_uncached_on_cuda(gpu_data, tmp_path, precision, dtype, atol):
    extra = [f"trainer.precision={precision}", f"cache.dir={tmp_path / 'cache'}", f"cache.dtype={dtype}"]
    plain, _, _ = fit(gpu_data, tmp_path / "plain", "cache.enabled=false", *extra)
    cached, _, _ = fit(gpu_data, tmp_path / "cached", "cache.enabled=true", *extra)
    assert plain.backbone_calls == STEPS and cached.backbone_calls == 0  # cached steps never run the backbone
    assert len(plain.losses) == len(cached.losses) == STEPS
    assert len(set(np.round(plain.losses, 6))) > 1  # the losses move: the comparison is not vacuous
    diff = float(np.abs(np.array(cached.losses) - np.array(plain.losses)).max())
    assert diff <= atol, (precision, dtype, diff, plain.losses, cached.losses)


# ---- evaluation on the GPU equals evaluation on the CPU --------------------------------------------

def test_evaluation_on_cuda_equals_cpu(trained, gpu_data, tmp_path):
    """eval_segmentation.py device=cuda vs device=cpu on one checkpoint, both with the torch CRF (the
    CPU's pydensecrf is compared with the torch CRF by test_e2e): metrics within 0.05."""
    ckpt = Path(trained("bf16-mixed")["output_dir"]) / "checkpoints" / "last.ckpt"
    metrics = {}
    for device in ("cuda", "cpu"):
        run_script("eval_segmentation.py", f"model_paths=[{ckpt}]", f"data_dir={gpu_data}", "crf=true",
                   "crf_backend=torch", f"device={device}", "n_images=0", "batch_size=4", "num_workers=0",
                   f"output_dir={tmp_path / device}", timeout=300)
        metrics[device] = json.loads(next((tmp_path / device).glob("last-*/metrics.json")).read_text())
    gpu, cpu = metrics["cuda"], metrics["cpu"]
    assert gpu["n_evaluated"] == cpu["n_evaluated"] == 4
    for key in ("mIoU", "Accuracy"):
        assert gpu[key] == pytest.approx(cpu[key], abs=0.05), (key, gpu[key], cpu[key])
        assert gpu["nocrf"][key] == pytest.approx(cpu["nocrf"][key], abs=0.05), (key, gpu["nocrf"],
                                                                                  cpu["nocrf"])


# ---- the torch CRF on CUDA against pydensecrf --------------------------------------------------------

def test_torch_crf_on_cuda_matches_pydensecrf():
    """The parity bounds of tests/test_crf_torch.py: max |marginal difference| <= 1e-3 and >= 99.9% of
    the pixels with the same argmax, at the realistic size (320x320, 27 classes) and on noise."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed")
    from test_crf_torch import MAX_ABS, MIN_AGREEMENT, noisy_logits, random_image, random_logits

    from smooseg.data.synthetic import street_scene
    from smooseg.eval.crf import dense_crf
    from smooseg.eval.crf_torch import dense_crf_torch

    rng = np.random.default_rng(320)
    scene, labels = street_scene(rng, (320, 320))
    small, small_labels = street_scene(rng, (45, 70))
    cases = {"scene 320x320 K=27": (scene, noisy_logits(rng, labels, 27, (80, 80))),
             "noise 96x128 K=27": (random_image(rng, 96, 128), random_logits(rng, 27, (24, 32))),
             "scene 45x70 K=3": (small, noisy_logits(rng, small_labels, 3, (11, 17)))}
    for name, (image, log_probs) in cases.items():
        ref = dense_crf(image, log_probs)
        out = dense_crf_torch(torch.from_numpy(image).cuda(), log_probs.cuda())
        assert out.is_cuda and tuple(out.shape) == ref.shape
        out = out.cpu().numpy()
        max_abs, agreement = float(np.abs(out - ref).max()), float((out.argmax(0) == ref.argmax(0)).mean())
        assert max_abs <= MAX_ABS and agreement >= MIN_AGREEMENT, (name, max_abs, agreement)
    # a batch in one call (one lattice build) equals the images one by one, on the GPU too
    images = torch.from_numpy(np.stack([scene, scene[:, ::-1].copy()])).cuda()
    log_probs = torch.stack([noisy_logits(rng, labels, 27, (80, 80)) for _ in range(2)]).cuda()
    batch = dense_crf_torch(images, log_probs)
    for i in range(2):
        single = dense_crf_torch(images[i], log_probs[i])
        diff = float((batch[i] - single).abs().max())
        assert diff <= 1e-5, (i, diff)


# ---- resume on the GPU -------------------------------------------------------------------------------

def test_resume_on_cuda(trained, gpu_data, tmp_path):
    """ckpt_path=last continues at the saved step and ends near an uninterrupted run (floating-point
    tolerance: some CUDA kernels are not deterministic)."""
    first = trained("bf16-mixed")
    out = tmp_path / "resumed"
    shutil.copytree(Path(first["output_dir"]) / "checkpoints", out / "checkpoints")
    resumed, last, _ = fit(gpu_data, out, "trainer.precision=bf16-mixed", f"max_steps={STEPS + 2}",
                           "ckpt_path=last")
    assert resumed.device == "cuda" and resumed.start == STEPS and len(resumed.losses) == 2  # continued
    assert last["global_step"] == STEPS + 2 and np.isfinite(resumed.losses).all()
    before = first["last_ckpt"]["state_dict"]["net.predictor.teacher"]
    assert not torch.equal(last["state_dict"]["net.predictor.teacher"], before)  # the EMA went on
    straight, straight_last, _ = fit(gpu_data, tmp_path / "straight", "trainer.precision=bf16-mixed",
                                     f"max_steps={STEPS + 2}")
    np.testing.assert_allclose(resumed.losses, straight.losses[STEPS:], rtol=1e-3, atol=1e-4)
    for key, value in straight_last["state_dict"].items():
        if value.is_floating_point():
            diff = float((last["state_dict"][key].float() - value.float()).abs().max())
            assert diff <= 1e-3, (key, diff)


# ---- eager against compiled (last: compiling takes the longest) -------------------------------------

@pytest.mark.parametrize("backbone_precision,tol", [("32", 1e-3), ("bf16", 3e-2)])
def test_compiled_matches_eager_on_cuda(gpu_data, backbone_precision, tol):
    """perf.compile=true: the compiled backbone and heads + loss give the eager features and losses."""
    from smooseg.train.train import build_module

    def module(compile_):
        cfg = train_settings(OVERRIDES + [f"data_dir={gpu_data}", f"perf.compile={str(compile_).lower()}",
                                        f"perf.backbone_precision={backbone_precision}",
                                        "model.dropout=false"])
        pl.seed_everything(0)
        return build_module(cfg).cuda().train()

    eager, compiled = module(False), module(True)
    assert compiled.compile and not eager.compile
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same initial weights
    batch = {"img": torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(0)).cuda()}
    torch.manual_seed(1)
    eager_feats = eager.features(batch)
    eager_losses = eager.training_losses(eager_feats)
    torch.manual_seed(1)
    feats = compiled.features(batch)
    losses = compiled.training_losses(feats)
    assert feats.is_cuda and set(compiled.net._compiled) == {"backbone"}
    assert compiled._compiled_losses is not None
    diff = float((feats - eager_feats).abs().max())
    assert diff <= tol * max(1.0, float(eager_feats.abs().max())), ("features", diff)
    for key in ("total", "intra", "inter", "data"):
        d = float((losses["terms"][key] - eager_losses["terms"][key]).detach().abs())
        assert d <= tol * max(1.0, float(eager_losses["terms"][key].abs())), (key, d)
    losses["terms"]["total"].backward()
    assert compiled.net.predictor.student.grad is not None
    assert torch.isfinite(compiled.net.projector.linear.weight.grad).all()
