"""``compile=True``: the compiled backbone and heads + loss give what the eager ones give."""

import torch

from smooseg.module import SmooSegModule


def test_compiled_training_matches_eager():
    torch.manual_seed(0)
    module = SmooSegModule(n_classes=3, dataset_name="directory", model_type="vit_small", patch_size=16,
                           pretrained=False, dropout=False, compile=False)
    batch = {"img": torch.randn(2, 3, 32, 32)}
    torch.manual_seed(1)
    eager_feats = module.features(batch)
    eager = module.training_losses(eager_feats)
    module.hparams.compile = True
    torch.manual_seed(1)
    feats = module.features(batch)
    compiled = module.training_losses(feats)
    assert set(module._compiled) == {"backbone", "losses"}
    torch.testing.assert_close(feats, eager_feats, rtol=1e-4, atol=1e-4)
    for key in ("total", "smooth", "data"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    compiled["total"].backward()
    assert module.predictor.student.grad is not None and module.projector.linear.weight.grad is not None
    assert set(module.state_dict()) == set(SmooSegModule(
        n_classes=3, dataset_name="directory", model_type="vit_small", patch_size=16,
        pretrained=False).state_dict())
