"""``compile=True``: the compiled backbone and heads + loss give what the eager ones give (a ViT-S/16
of two blocks: the code path of twelve, a sixth of inductor's compile time on the CPU)."""

import torch

from conftest import make_module
from official_layouts import shallow_timm


def test_compiled_training_matches_eager():
    torch.manual_seed(0)
    with shallow_timm(depth=2):
        module = make_module(n_classes=3, dataset_name="directory", model_type="vit_small", patch_size=16,
                             dropout=False, compile=False)
    batch = {"img": torch.randn(2, 3, 32, 32)}
    torch.manual_seed(1)
    eager_feats = module.features(batch)
    eager = module.training_losses(eager_feats)
    module.compile = module.net.compile_backbone = True
    torch.manual_seed(1)
    feats = module.features(batch)
    compiled = module.training_losses(feats)
    assert set(module.net._compiled) == {"backbone"} and module._compiled_losses is not None
    torch.testing.assert_close(feats, eager_feats, rtol=1e-4, atol=1e-4)
    for key in ("total", "intra", "inter", "data"):
        torch.testing.assert_close(compiled["terms"][key], eager["terms"][key], rtol=1e-4, atol=1e-5)
    compiled["terms"]["total"].backward()
    assert module.net.predictor.student.grad is not None
    assert module.net.projector.linear.weight.grad is not None
    with shallow_timm(depth=2):
        eager_module = make_module(n_classes=3, dataset_name="directory", model_type="vit_small",
                                   patch_size=16)
    assert set(module.state_dict()) == set(eager_module.state_dict())
