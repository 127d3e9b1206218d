"""The backbone registry: one spec per backbone read by the presets, the feature-cache key and the
entry points; adding a backbone is one registry entry (docs/extending.md, "Add a backbone")."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TRAIN_OVERRIDES, run_script, train_config
from official_layouts import image, shallow_backbone
from smooseg.errors import SmoosegError
from smooseg.model.backbones import (
    POS_ROPE,
    POS_SCALE_OFFSET,
    POS_SIZE_ANTIALIAS,
    BackboneSpec,
    Release,
    backbone_spec,
    convert_identity,
    list_backbones,
    register,
    unregister,
)
from smooseg.model.weights import timm_name
from smooseg.train import feature_cache as fc

MODEL_PRESETS = ROOT / "smooseg" / "configs" / "model"


def _presets():
    from smooseg.settings import ModelSettings

    def values(path):
        loaded = OmegaConf.load(path)
        loaded.pop("defaults", None)
        return loaded

    out = {}
    for path in sorted(MODEL_PRESETS.glob("*.yaml")):
        if path.stem != "base":
            out[path.stem] = OmegaConf.merge(OmegaConf.structured(ModelSettings),
                                             values(MODEL_PRESETS / "base.yaml"), values(path))
    return out


def test_every_backbone_has_a_preset_and_every_preset_a_backbone():
    presets = _presets()
    covered = set()
    for cfg in presets.values():
        spec = backbone_spec(cfg.arch, cfg.model_type, cfg.patch_size)
        assert spec.release(cfg.weights_data).data  # a valid release
        assert cfg.fit is None  # the spec's default: fit is declared once, in the spec
        covered.add(spec.key)
    assert covered == set(list_backbones())
    assert presets["dinov3_vitl16_sat"].weights_data == "sat493m"


def test_spec_facts():
    assert len(list_backbones()) == len(set(list_backbones())) == 4 + 4 + 4 + 5
    assert timm_name("dinov3", "vit_small", 16) == "vit_small_patch16_dinov3_qkvb.lvd1689m"
    assert timm_name("dinov2_reg", "vit_base", 14) == "vit_base_patch14_reg4_dinov2.lvd142m"
    policies = {a: backbone_spec(a, "vit_base", p).pos_embed
                for a, p in (("dino", 16), ("dinov2", 14), ("dinov2_reg", 14), ("dinov3", 16))}
    assert policies == {"dino": POS_SCALE_OFFSET, "dinov2": POS_SCALE_OFFSET,
                        "dinov2_reg": POS_SIZE_ANTIALIAS, "dinov3": POS_ROPE}
    fits = {a: backbone_spec(a, "vit_base", p).fit
            for a, p in (("dino", 16), ("dinov2", 14), ("dinov2_reg", 14), ("dinov3", 16))}
    assert fits == {"dino": "error", "dinov2": "resize", "dinov2_reg": "resize", "dinov3": "error"}
    assert backbone_spec("dinov3", "vit_base", 16).gated
    assert not backbone_spec("dinov2_reg", "vit_base", 14).gated
    with pytest.raises(SmoosegError, match=r"arch=dinov3 model_type=vit_giant.*dinov3/vit_huge_plus/16"):
        backbone_spec("dinov3", "vit_giant", 16)
    with pytest.raises(ValueError, match="already registered"):
        register(backbone_spec("dino", "vit_small", 8))


def test_cache_key_differs_across_families_and_policies():
    torch.manual_seed(0)
    backbones = {key: shallow_backbone(*key, pretrained=False, depth=1)
                 for key in (("dino", "vit_small", 16), ("dinov2", "vit_small", 14),
                             ("dinov2_reg", "vit_small", 14), ("dinov3", "vit_small", 16))}
    fields = {key: fc.cache_fields("cityscapes", "train", 64, "center", "nearest", None, b)
              for key, b in backbones.items()}
    assert len({fc.cache_key(f) for f in fields.values()}) == 4
    # DINO's policy keeps its name, so caches built before the registry stay valid
    assert fields[("dino", "vit_small", 16)]["pos_embed"] == "official-bicubic-scale-factor-offset0.1"
    assert fields[("dinov2_reg", "vit_small", 14)]["pos_embed"] == POS_SIZE_ANTIALIAS
    # the same weights under another position policy are another key
    reg = backbones[("dinov2_reg", "vit_small", 14)]
    same = dict(fields[("dinov2_reg", "vit_small", 14)], pos_embed=POS_SCALE_OFFSET)
    assert fc.cache_key(same) != fc.cache_key(fields[("dinov2_reg", "vit_small", 14)])
    # DINOv3's file periods and the SAT re-normalisation (non-persistent buffers) are in the digest
    v3 = backbones[("dinov3", "vit_small", 16)]
    before = fc.weights_digest(v3)
    with torch.no_grad():
        v3.model.rope.periods.copy_(v3.model.rope.periods.bfloat16().float())
    assert fc.weights_digest(v3) != before
    assert reg.weights_data == "lvd142m"


# ---- the recipe of docs/extending.md: a backbone added by one registry entry ----

TINY = BackboneSpec(
    arch="tiny", model_type="vit_tiny", patch_size=16, timm_model="vit_tiny_patch16_224",
    releases=(Release("imagenet", "tiny/vit_tiny_patch16.pth", "augreg_in21k"),),
    convert=convert_identity, pos_embed=POS_SIZE_ANTIALIAS, fit="error", licence="Apache-2.0")


@pytest.fixture
def tiny_spec():
    register(TINY)
    try:
        yield TINY
    finally:
        unregister(TINY.key)


def _train(cfg):
    """Train (and run its final evaluation) in-process, as train_segmentation.py does."""
    from smooseg.settings import train_settings
    from smooseg.train.train import train

    return train(train_settings(cfg))


@pytest.mark.slow
def test_recipe_register_a_backbone_then_train_and_evaluate(tiny_spec, synthetic_data, tmp_path):
    net = shallow_backbone("tiny", "vit_tiny", 16, pretrained=False, depth=1)
    assert net.n_feats == 192 and net(image(64, 64)).shape == (1, 192, 4, 4)
    overrides = [o for o in TRAIN_OVERRIDES if not o.startswith(("max_steps", "val_check_interval"))]
    overrides += ["model.arch=tiny", "model.model_type=vit_tiny", "model.patch_size=16", "max_steps=4",
                  "val_check_interval=4", f"data_dir={synthetic_data}", f"output_dir={tmp_path}"]
    _train(train_config(overrides))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((tmp_path / "final_eval" / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 100 and metrics["n_evaluated"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dinov3_vits16", "dinov2_reg_vits14"])
def test_new_families_train_and_evaluate_through_the_entry_points(preset, synthetic_data, tmp_path):
    """4 steps of training and an evaluation of the last checkpoint (random init, 64 px)."""
    dropped = ("model=", "max_steps", "val_check_interval")
    overrides = [o for o in TRAIN_OVERRIDES if not o.startswith(dropped)]
    res = ["res=56", "val_res=56", "eval_res=56"] if preset.startswith("dinov2") else []
    out = tmp_path / "run"
    run_script("train_segmentation.py", *overrides, f"model={preset}", "max_steps=4", "val_check_interval=4",
               *res, f"data_dir={synthetic_data}", f"output_dir={out}", timeout=600)
    last = out / "checkpoints" / "last.ckpt"
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.arch == preset.split("_vit")[0] and last.is_file()
    run_script("eval_segmentation.py", f"model_paths=[{last}]", "crf=false", f"data_dir={synthetic_data}",
               "n_images=1", "batch_size=4", "num_workers=0", f"output_dir={tmp_path / 'eval'}", timeout=600)
    (result,) = (tmp_path / "eval").glob("last-*/metrics.json")  # <stem>-<sha256[:10]>/
    metrics = json.loads(result.read_text())
    assert 0 <= metrics["mIoU"] <= 100 and metrics["n_evaluated"] == 8


def test_backbone_bench_runs(tmp_path, capsys):
    from benchmarks import backbone_bench

    out = tmp_path / "bench.json"
    assert backbone_bench.main(["--depth", "1", "--repeats", "1", "--rows", "dinov3_vits16@32",
                                "dinov2_reg_vits14@28", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backbone"], r["grid"]) for r in rows] == [("dinov3/vit_small/16", [2, 2]),
                                                          ("dinov2_reg/vit_small/14", [2, 2])]
    assert all(r["ms_per_image"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert "ms / image" in capsys.readouterr().out
    assert backbone_bench.main(["--rows", "mae@224"]) == 2


@pytest.mark.slow
def test_gated_weights_stop_the_entry_point_with_one_line(tmp_path, monkeypatch, entry_point):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proc = entry_point("train_segmentation.py", "experiment=demo", "model=dinov3_vits16",
                       f"output_dir={tmp_path / 'run'}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ")
    assert "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in last and "gated" in last
    assert "model.weights_path" in last and "model.weights_url" in last
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists()
