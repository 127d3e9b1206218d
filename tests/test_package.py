"""The package as a user installs it: a wheel built from the repository, installed (not editable)
into a fresh virtual environment, runs smooseg-train and smooseg-eval from an empty folder with
the configs it ships."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.conftest import ROOT, TRAIN_OVERRIDES

SCRIPTS = ("smooseg-train", "smooseg-eval", "smooseg-segment", "smooseg-download", "smooseg-crop")
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "smooseg")  # what the wheel is built from


def run(command, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {proc.returncode}\n--- stdout\n"
                    f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip wheel`` builds from a copy of the repository's sources (offline: this
    environment's setuptools, no build isolation)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source],
        cwd=source)
    (path,) = out.glob("smooseg-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed (--no-deps); the dependencies then
    come from this environment's site-packages through a .pth file (offline and fast; written
    after the install, so pip does not take this environment's smooseg for the one installed)."""
    env_dir = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", env_dir], cwd=env_dir)
    python = env_dir / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=env_dir,
        env=clean_env())
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=env_dir).stdout.strip())
    (site / "main_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env_dir


def clean_env():
    """The environment without PYTHONPATH (nothing from the checkout may be imported)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def test_wheel_ships_configs_license_scripts_and_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = Parser().parsestr(archive.read(next(n for n in names if n.endswith("METADATA"))).decode())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    configs = {n.split("smooseg/configs/", 1)[1] for n in names if "smooseg/configs/" in n}
    shipped = {p.relative_to(ROOT / "smooseg" / "configs").as_posix()
               for p in (ROOT / "smooseg" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= configs
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "MIT"
    assert {"wandb", "mlflow", "slurm"} <= set(meta.get_all("Provides-Extra"))
    for script in SCRIPTS:
        assert f"{script} = smooseg.commands." in entry_points


@pytest.mark.slow
def test_installed_console_scripts_train_and_eval_from_an_empty_folder(venv, synthetic_data, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    bin_dir = venv / "bin"
    where = run([bin_dir / "python", "-c", "import smooseg; print(smooseg.__file__)"], cwd=work,
                env=clean_env())
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    # every console script is installed and its program loads (one process); smooseg-train and
    # smooseg-eval run below, one of the others shows its help
    load = ("from importlib.metadata import entry_points; "
            "print(' '.join(sorted(ep.name for ep in entry_points(group='console_scripts') "
            "if ep.name.startswith('smooseg-') and callable(ep.load()))))")
    assert run([bin_dir / "python", "-c", load], cwd=work, env=clean_env()).stdout.split() == sorted(SCRIPTS)
    assert all((bin_dir / script).is_file() for script in SCRIPTS)
    shown = run([bin_dir / "smooseg-segment", "--help"], cwd=work, env=clean_env()).stdout
    assert "smooseg-segment: " in shown
    tiny = [o for o in TRAIN_OVERRIDES if not o.startswith(("max_steps", "val_check_interval"))]
    run([bin_dir / "smooseg-train", *tiny, "max_steps=4", "val_check_interval=2", "batch_size=4",
         f"data_dir={synthetic_data}", "output_dir=run"], cwd=work, env=clean_env())
    trained = json.loads((work / "run" / "final_eval" / "metrics.json").read_text())
    run([bin_dir / "smooseg-eval", "model_paths=[run/checkpoints/last.ckpt]", f"data_dir={synthetic_data}",
         "crf=false", "n_images=0", "num_workers=0", "output_dir=eval"], cwd=work, env=clean_env())
    (metrics,) = (work / "eval").glob("*/metrics.json")
    evaluated = json.loads(metrics.read_text())
    assert 0 <= evaluated["mIoU"] <= 100 and evaluated["crf"] is False
    assert sorted(p.name for p in work.iterdir()) == ["eval", "run"]
    assert trained["checkpoint"].endswith(".ckpt")
