"""Own photos without labels, end to end through the entry points: training finds
``dataset.n_clusters`` clusters with no validation folder and logs pictures but no metric (no NaN
anywhere), segmentation works, and evaluation is refused with one line that points to
segment_images.py."""

import math

import pytest

from conftest import run_script
from smooseg.data.synthetic import write_directory_layout


@pytest.mark.slow
def test_unlabelled_photos_train_segment_and_refuse_evaluation(tmp_path, entry_point):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_directory_layout(tmp_path / "data", name="photos", n_train=4, n_val=0, size=(32, 32),
                                  with_labels=False)
    run = tmp_path / "run"
    proc = run_script("train_segmentation.py", "experiment=demo", "dataset=directory",
                      "dataset.dir_name=photos", "dataset.n_clusters=4", "model=dino_vits16",
                      "model.pretrained=false", "res=32", "eval_res=32", "batch_size=2", "num_workers=0",
                      "max_steps=4", "val_check_interval=2", "n_log_images=2", f"data_dir={data}",
                      f"output_dir={run}")
    text = proc.stdout + proc.stderr + (run / "train_segmentation.log").read_text()
    assert "nan" not in text.lower(), text[-2000:]
    assert "final evaluation skipped: the validation images have no labels" in proc.stdout
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("val/")]
    assert all(math.isfinite(e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    assert "val/examples" in events.Tags()["images"]  # validation still draws its pictures

    segmented = tmp_path / "segmented"
    run_script("segment_images.py", f"model_path={run / 'checkpoints' / 'last.ckpt'}",
               f"input_dir={data / 'photos' / 'imgs' / 'train'}", f"output_dir={segmented}", "size=32",
               "progress=false")
    assert len(list(segmented.glob("*_side.png"))) == 4

    refused = entry_point("eval_segmentation.py", f"model_paths=[{run / 'checkpoints' / 'last.ckpt'}]",
                          f"data_dir={data}", "split=train", "crf=false", f"output_dir={tmp_path / 'eval'}")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "has no labels" in lines[0] and "segment_images.py" in lines[0]
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_all_ignore_validation_labels_say_why_and_keep_no_nan_checkpoint(tmp_path):
    """Label files whose every pixel is the ignore value: no ``best-…-mIoUnan`` file, no NaN logged,
    each '-' explained in one line."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_directory_layout(tmp_path / "data", n_train=4, n_val=2, size=(32, 32))
    for label in (data / "mydata" / "labels" / "val").glob("*.png"):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(label)
    run = tmp_path / "run"
    proc = run_script("train_segmentation.py", "experiment=demo", "dataset=directory",
                      "dataset.dir_name=mydata", "dataset.n_classes=6", "model=dino_vits16",
                      "model.pretrained=false", "res=32", "eval_res=32", "batch_size=2", "num_workers=0",
                      "max_steps=4", "val_check_interval=2",
                      f"data_dir={data}", f"output_dir={run}")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert proc.stdout.count("validation: no pixel of the validation images has a class label") == 1
    assert "no best checkpoint: no validation scored a labelled pixel" in proc.stdout
    assert "no score: no pixel of these images has a class label" in proc.stdout  # the final evaluation
    text = proc.stdout + proc.stderr + (run / "train_segmentation.log").read_text()
    assert "nan" not in text.lower() and "-inf" not in text, text[-2000:]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith(("val/", "final_eval/"))]
    assert all(math.isfinite(e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
