"""`make demo`: SmooSeg end to end on CPU in a few minutes, on synthetic street scenes.

Writes a synthetic Cityscapes-layout data set, evaluates the untrained model, trains with
``experiment=demo``, evaluates the best checkpoint (flip + dense CRF) and prints both metric
sets and where everything went. Extra ``key=value`` arguments override the training config;
``crf_backend=`` / ``crf_workers=`` go to the evaluation (e.g. ``python demo.py crf_backend=torch``).
"""

import shutil
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir

from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError
from smooseg.eval.evaluate import run_eval
from smooseg.logs import quiet_known_noise
from smooseg.model.checkpoints import load_net
from smooseg.model.weights import official_weights, weights_cache_path
from smooseg.settings import eval_settings, train_settings
from smooseg.train.train import build_module, train

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "demo_output"
SCENES = dict(n_train=64, n_val=16, size=(96, 192), seed=0)


def compose_config(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def weights_available(model_cfg):
    """Whether the official DINO file is at model.weights_path or in the torch hub cache."""
    if model_cfg.weights_path:
        return Path(model_cfg.weights_path).expanduser().is_file()
    filename, _ = official_weights(model_cfg.arch, model_cfg.model_type, model_cfg.patch_size)
    return weights_cache_path(filename).is_file()


def headline(metrics):
    return f"mIoU {metrics['mIoU']:6.2f}   Accuracy {metrics['Accuracy']:6.2f}"


EVAL_KEYS = ("crf_backend=", "crf_workers=")  # overrides for the evaluation, not the training


def main(overrides):
    start = time.time()
    eval_overrides = [o for o in overrides if o.startswith(EVAL_KEYS)]
    overrides = [o for o in overrides if not o.startswith(EVAL_KEYS)]
    data_dir = OUT / "data"
    if not (data_dir / "cityscapes").is_dir():
        write_cityscapes_layout(data_dir, **SCENES)
    print(f"synthetic Cityscapes-layout data: {data_dir}")
    base = ["experiment=demo", f"data_dir={data_dir}", f"output_dir={OUT / 'train'}"]
    cfg = train_settings(compose_config("train", base + list(overrides)))
    if cfg.model.pretrained and not weights_available(cfg.model):
        print("No DINO weights found: using a random-init backbone (demo only)")
        cfg = train_settings(compose_config("train", base + ["model.pretrained=false"] + list(overrides)))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    eval_cfg = eval_settings(compose_config("eval", [
        "model_paths=[]", f"data_dir={data_dir}", f"output_dir={OUT / 'eval'}", "device=cpu", "n_images=4",
        "report=true", *eval_overrides]))

    quiet_known_noise()
    pl.seed_everything(cfg.seed, workers=True)
    untrained = build_module(cfg)  # the same initial weights train() starts from
    print("== evaluating the untrained model (flip + CRF)")
    (before,) = run_eval(eval_cfg, models=[("untrained", untrained.net, dict(untrained.hparams))])
    print(f"== training: {cfg.max_steps} steps, batch {cfg.batch_size}, {cfg.res} px")
    result = train(cfg)
    print("== evaluating the trained model (flip + CRF)")
    (after,) = run_eval(eval_cfg, models=[("trained", *load_net(result["best"]))])

    print("\n== SmooSeg demo summary (synthetic val set, flip + CRF)")
    print(f"untrained: {headline(before)}")
    print(f"trained:   {headline(after)}   (best checkpoint, step by validation mIoU)")
    print(f"checkpoints:  {Path(cfg.output_dir) / 'checkpoints'}")
    print(f"tensorboard:  tensorboard --logdir {Path(cfg.output_dir) / 'tensorboard'}")
    print(f"metrics+PNGs: {Path(eval_cfg.output_dir) / 'untrained'}  {Path(eval_cfg.output_dir) / 'trained'}")
    print(f"done in {time.time() - start:.0f} s")
    return before, after


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SmoosegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
