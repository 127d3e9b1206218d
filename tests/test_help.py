"""--help of each program: its description, the commands to start from, its keys with their
defaults and YAML comments, and only the preset groups it uses (the time it takes is measured by
benchmarks/help_bench.py, not here)."""

import pytest

from tests.conftest import run_script

SCRIPTS = {
    "train_segmentation.py": ("Train SmooSeg", "temperature: 0.1", "# training crop size"),
    "eval_segmentation.py": ("Evaluate checkpoints", "flip: true", "# horizontal-flip averaging"),
    "segment_images.py": ("Segment your own images", "mode: resize", "# dense CRF refinement"),
    "download_datasets.py": ("Download and extract", "keep_archive: false",
                             "# keep <name>.zip after extraction"),
    "crop_datasets.py": ("pre-cropped training sets", "crop_ratio: 0.5", "# crop side = crop_ratio x each"),
}


@pytest.fixture(scope="module")
def pages():
    """Each program's ``--help`` run, once."""
    return {script: run_script(script, "--help") for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_description_keys_and_comments(script, pages):
    description, key, comment = SCRIPTS[script]
    proc = pages[script]
    assert description in proc.stdout.splitlines()[0]
    assert key in proc.stdout and comment in proc.stdout
    assert "Start from:\n  smooseg-" in proc.stdout
    assert "defaults:" not in proc.stdout and "hydra:" not in proc.stdout  # Hydra's plumbing left out
    assert proc.stderr == ""


def test_help_lists_only_the_groups_a_program_uses(pages):
    train = pages["train_segmentation.py"].stdout
    for group in ("dataset", "model", "trainer", "logger", "experiment", "hydra/launcher"):
        assert f"\n  {group}: " in train
    assert "logger: csv | mlflow | none | tensorboard* | wandb" in train
    assert "model: " in train and "dino_vits8*" in train
    evaluate = pages["eval_segmentation.py"].stdout
    assert "\n  dataset: cityscapes | cocostuff27" in evaluate  # no default: the checkpoint's data set
    assert "\n  dataset:  # null: the checkpoint's data set\n    name: ???" in evaluate  # X | None section
    for group in ("model", "trainer", "logger", "experiment", "hydra/launcher"):
        assert f"\n  {group}: " not in evaluate
    segment = pages["segment_images.py"].stdout
    assert "Presets" not in segment and "[group=preset" not in segment


def test_help_does_not_run_or_write_anything(tmp_path):
    run_script("train_segmentation.py", f"output_dir={tmp_path / 'run'}", "--help")
    run_script("eval_segmentation.py", f"output_dir={tmp_path / 'eval'}", "-h")
    assert not list(tmp_path.iterdir())


def test_hydra_help_is_still_hydras():
    proc = run_script("eval_segmentation.py", "--hydra-help")
    assert "Hydra (" in proc.stdout


def test_help_bench_times_every_program(tmp_path):
    """The benchmark line runs (no time is asserted here: benchmarks/help_bench.py reports it)."""
    import json

    from benchmarks import help_bench

    results = help_bench.main(["--repeats", "1", "--json", str(tmp_path / "help.json")])
    assert set(results) == set(SCRIPTS) and all(seconds > 0 for seconds in results.values())
    assert json.loads((tmp_path / "help.json").read_text())["help_seconds"] == pytest.approx(results)
