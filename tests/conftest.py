"""Shared fixtures: a tiny synthetic Cityscapes-layout set and one short training run through
train_segmentation.py, reused by the end-to-end and checkpoint tests."""

import logging
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import smooseg.settings

ROOT = Path(__file__).resolve().parents[1]
RESTORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

# A short CPU run: the demo preset with a ViT-S/16 (4x4 patch grid at 64 px) for speed.
TRAIN_OVERRIDES = [
    "experiment=demo", "model=dino_vits16", "model.pretrained=false", "max_steps=60",
    "val_check_interval=30", "batch_size=8", "num_workers=0", "seed=0",
    "trainer.enable_progress_bar=false",
]


def run_script(script, *args, timeout=300, check=True):
    """Run an entry point of the repository in a subprocess; fail the test with its output on error."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def restore_logging():
    """Hydra reconfigures the root logger for each run; put the test process's logging back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def entry_point(monkeypatch, capfd, restore_logging):
    """``entry_point(script, *args, cwd=None)``: run ``python <script> <args>`` in this process, as
    its ``__main__``, and return what ``subprocess.run`` would (exit status, stdout, stderr). For
    runs that stop early (a refused value, a missing file) where a new interpreter would cost
    seconds of imports; test_bad_inputs.py checks it behaves as a real process."""
    def run(script, *args, cwd=None):
        args = [str(arg) for arg in args]
        monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
        monkeypatch.chdir(ROOT if cwd is None else cwd)
        # what a program may change for its own process: put it back for the next test
        environ, handlers = dict(os.environ), {s: signal.getsignal(s) for s in RESTORED_SIGNALS}
        threads = torch.get_num_threads()
        capfd.readouterr()
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            status = 0
        except SystemExit as stopped:
            status = stopped.code if isinstance(stopped.code, int) else (0 if stopped.code is None else 1)
        finally:
            os.environ.clear()
            os.environ.update(environ)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            torch.set_num_threads(threads)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([script, *args], status, out, err)
    return run


def compose_config(name, overrides=()):
    """Compose smooseg/configs/<name>.yaml with ``overrides`` (as the entry point would)."""
    with initialize_config_dir(config_dir=str(ROOT / "smooseg" / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def train_config(overrides):
    """The composed training config (a DictConfig, as Hydra hands it to the entry point)."""
    return compose_config("train", overrides)


def train_settings(overrides):
    """The checked and resolved TrainSettings of ``overrides``, as train_segmentation.py makes them."""
    return smooseg.settings.train_settings(train_config(overrides))


def eval_settings(overrides):
    """The checked and resolved EvalSettings of ``overrides``, as eval_segmentation.py makes them."""
    return smooseg.settings.eval_settings(compose_config("eval", overrides))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """data_dir with cityscapes/ holding 16 train and 8 val synthetic 64x128 scenes."""
    from smooseg.data.synthetic import write_cityscapes_layout

    return write_cityscapes_layout(tmp_path_factory.mktemp("data"), n_train=16, n_val=8,
                                   size=(64, 128), seed=0)


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory):
    """One training run: dict(data_dir, output_dir, overrides, best, last, stdout)."""
    output_dir = tmp_path_factory.mktemp("train")
    overrides = TRAIN_OVERRIDES + [f"data_dir={synthetic_data}", f"output_dir={output_dir}"]
    proc = run_script("train_segmentation.py", *overrides, timeout=600)
    checkpoints = output_dir / "checkpoints"
    best = sorted(checkpoints.glob("best-*.ckpt"))
    return {
        "data_dir": Path(synthetic_data), "output_dir": output_dir, "overrides": overrides,
        "best": best[0] if best else None, "last": checkpoints / "last.ckpt", "stdout": proc.stdout,
    }


def make_module(pretrained=False, n_classes=3, extra_clusters=0, dataset_name="directory", linear_probe=False,
                **options):
    """A SmooSegModule built as training builds one: a :class:`NetConfig` (``n_classes`` +
    ``extra_clusters`` clusters, a linear probe when ``linear_probe``), the :class:`DatasetInfo` of
    ``dataset_name`` (its other fields by name), :class:`LossConfig` and :class:`OptimConfig` from the
    options named after their fields, the rest the module's own keywords; random-init backbone unless
    ``pretrained``."""
    import dataclasses

    from smooseg.data.datasets import DatasetInfo
    from smooseg.model.losses import LossConfig
    from smooseg.model.net import NetConfig, SmooSegNet
    from smooseg.train.module import OptimConfig, SmooSegModule

    def take(cls):
        return {f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options}

    config = NetConfig(n_clusters=n_classes + extra_clusters,
                       linear_probe_classes=n_classes if linear_probe else None, **take(NetConfig))
    net = SmooSegNet(config, pretrained=pretrained,
                     **{k: options.pop(k) for k in ("fused_attn", "backbone_precision") if k in options})
    data = DatasetInfo(n_classes=n_classes, name=dataset_name,
                       **{k: v for k, v in take(DatasetInfo).items() if k not in ("n_classes", "name")})
    return SmooSegModule(net, data, loss=LossConfig(**take(LossConfig)),
                         optim=OptimConfig(**take(OptimConfig)), **options)


def save_spread_checkpoint(path, n_classes, extra_clusters, seed=0):
    """Save a random-init ViT-S/16 SmooSeg model for Potsdam (``n_classes`` + ``extra_clusters``
    clusters) in the native layout, its teacher prototypes spread so that several clusters win
    somewhere; returns ``path``."""
    import torch

    torch.manual_seed(seed)
    module = make_module(n_classes=n_classes, dataset_name="potsdam", patch_size=16,
                         extra_clusters=extra_clusters)
    with torch.no_grad():
        module.net.predictor.teacher.copy_(torch.randn_like(module.net.predictor.teacher) * 3)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path
