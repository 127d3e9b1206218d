"""Typed settings (smooseg/settings.py): every key of every entry point is checked once, before a
run, with one line naming it; each ``auto`` is resolved once into the value the run uses."""

import dataclasses

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from test_crops import run_cli

from conftest import compose_config, train_settings
from smooseg import settings as S
from smooseg.cli import config_error_message
from smooseg.data.synthetic import write_cityscapes_layout
from smooseg.errors import SmoosegError

REQUIRED = {"train": ["experiment=demo"], "eval": ["model_paths=[a.ckpt]"],
            "segment": ["model_path=a.ckpt", "input_dir=photos"], "crop": [], "download": []}
TO_SETTINGS = {"train": S.train_settings, "eval": S.eval_settings, "segment": S.segment_settings,
               "crop": S.crop_settings, "download": S.download_settings}


def leaf_fields(schema, prefix=""):
    """(dotted key, field) of every setting of ``schema``, sections included."""
    for f in dataclasses.fields(schema):
        inner = f.metadata.get("section", f.type)
        inner = next((a for a in getattr(inner, "__args__", ()) if a is not type(None)), inner)
        if dataclasses.is_dataclass(inner):
            yield from leaf_fields(inner, f"{prefix}{f.name}.")
        elif f.name != "trainer" or prefix:
            yield f"{prefix}{f.name}", f


def wrong_value(f):
    """A value of the wrong type for the field ``f`` (as typed on a command line)."""
    kind = S._field_kind(f)
    if kind == "any" and not f.metadata:
        return "lots"
    if kind in ("int", "any"):
        return "1.5"
    if kind in ("float", "bool"):
        return "abc"
    if "choices" in f.metadata or "each" in f.metadata:
        return "[[nested]]" if "each" in f.metadata else "no_such_choice"
    return None  # a free string / path takes any word


def settings_or_error(name, overrides):
    """(settings, None) or (None, the one-line error) of ``overrides`` as the entry point sees them."""
    try:
        return TO_SETTINGS[name](compose_config(name, overrides)), None
    except ConfigCompositionException as err:
        return None, config_error_message(err, overrides)
    except SmoosegError as err:
        return None, str(err)


SWEEP = [(name, key, f) for name, schema in S.SCHEMAS.items() for key, f in leaf_fields(schema)
         if wrong_value(f) is not None and not (key.startswith("dataset.") and name == "eval")]


@pytest.mark.parametrize("name,key,f", SWEEP, ids=[f"{n}:{k}" for n, k, _ in SWEEP])
def test_every_key_given_a_wrong_type_is_one_line_naming_it(name, key, f, tmp_path):
    value = wrong_value(f)
    overrides = REQUIRED[name] + [f"{key}={value}"]
    if name == "train" and key.startswith("dataset.train_crop_source."):
        overrides = REQUIRED[name] + ["dataset=cityscapes", f"{key}={value}"]
    result, line = settings_or_error(name, overrides)
    assert result is None, f"{key}={value} was accepted"
    assert "\n" not in line and key in line, line


@pytest.mark.parametrize("key", ["trainer.precision", "trainer.accumulate_grad_batches", "trainer.num_nodes",
                                 "trainer.log_every_n_steps", "trainer.deterministic"])
def test_trainer_keys_are_typed_too(key):
    _, line = settings_or_error("train", ["experiment=demo", f"{key}=1.5"])
    assert line.startswith(f"{key}=1.5 is not allowed: {key} must be "), line


@pytest.mark.parametrize("word,meant", [("off", False), ("no", False), ("0", False), ("false", False),
                                        ("on", True), ("yes", True), ("1", True), ("True", True)])
def test_booleans_written_another_way_are_understood(word, meant):
    settings = train_settings(["experiment=demo", f"model.dropout={word}"])
    assert settings.model.dropout is meant


@pytest.mark.parametrize("override,line", [
    ("model.dropout=maybe", "model.dropout=maybe is not allowed: model.dropout must be true or false"),
    ("batch_size=2.5", "batch_size=2.5 is not allowed: batch_size must be an integer >= 1"),
    ("batch_size=2.0", "batch_size=2.0 is not allowed: batch_size must be an integer >= 1"),
    ("dataset.n_classes=2.5", "dataset.n_classes=2.5 is not allowed: "
                              "dataset.n_classes must be an integer >= 1"),
    ("seed=4294967296", "seed=4294967296 is not allowed: seed must be an integer in [0, 4294967295]"),
    ("trainer.precision=32-tru", "trainer.precision=32-tru is not allowed: "
                                 "trainer.precision must be one of auto,"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is not allowed: "
                                          "trainer.accumulate_grad_batches must be an integer >= 1"),
    ("final_eval.crf_backend=torhc", "final_eval.crf_backend=torhc is not allowed: "
                                     "final_eval.crf_backend must be one of auto, pydensecrf, torch"),
    ("perf.backbone_precision=bf17", "perf.backbone_precision=bf17 is not allowed: perf.backbone_precision "
                                     "must be one of auto, 32, bf16, 16"),
])
def test_bad_values_are_refused_with_the_range(override, line):
    _, message = settings_or_error("train", ["experiment=demo", override])
    assert message.startswith(line), message


@pytest.mark.parametrize("word", ["2", "maybe", "-1"])
def test_a_boolean_typed_as_a_number_is_refused(word):
    """OmegaConf reads any non-zero number as true: the entries check the words typed."""
    with pytest.raises(SmoosegError, match=f"final_eval.flip={word} is not allowed: final_eval.flip must be "
                                           "true or false"):
        S.check_bool_words(["seed=1", f"final_eval.flip={word}"], S.TrainSettings)
    with pytest.raises(SmoosegError, match="trainer.deterministic=2 is not allowed"):
        S.check_bool_words(["trainer.deterministic=2"], S.TrainSettings)
    S.check_bool_words(["final_eval.flip=Off", "flip=2"], S.TrainSettings)  # flip is not a training key


def test_the_largest_seed_is_taken():
    assert train_settings(["experiment=demo", f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_an_unset_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("SMOOSEG_UNSET_FOR_TEST", raising=False)
    _, line = settings_or_error("train", ["experiment=demo", "data_dir=${oc.env:SMOOSEG_UNSET_FOR_TEST}"])
    assert line == ("config key 'data_dir' reads the environment variable SMOOSEG_UNSET_FOR_TEST, "
                    "which is not set; set it (export SMOOSEG_UNSET_FOR_TEST=...) or pass data_dir=...")
    monkeypatch.setenv("SMOOSEG_UNSET_FOR_TEST", "/somewhere")
    settings = train_settings(["experiment=demo", "data_dir=${oc.env:SMOOSEG_UNSET_FOR_TEST}"])
    assert settings.data_dir == "/somewhere"


def test_the_default_data_dir_reads_smooseg_data(monkeypatch):
    monkeypatch.setenv("SMOOSEG_DATA", "/data/here")
    assert train_settings([]).data_dir == "/data/here"
    assert train_settings([]).cache.dir == "/data/here/feature_cache"


def test_fp32_trainer_runs_the_backbone_in_fp32():
    """trainer.precision=32-true means fp32 everywhere; the backbone follows unless told otherwise."""
    settings = train_settings(["experiment=demo", "trainer.precision=32-true"])
    assert (settings.trainer.precision, settings.perf.backbone_precision) == ("32-true", "32")
    short = train_settings(["experiment=demo", "trainer.precision=32"])
    assert (short.trainer.precision, short.perf.backbone_precision) == ("32-true", "32")
    own = train_settings(["experiment=demo", "trainer.precision=32-true", "perf.backbone_precision=bf16"])
    assert own.perf.backbone_precision == "bf16"
    assert S.backbone_precision("auto", "16-mixed") == "16"
    assert S.backbone_precision("auto", "bf16-mixed") == "bf16"


def test_every_auto_is_resolved_on_a_cpu_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = train_settings(["trainer=default", "final_eval.crf_workers=auto"])
    assert (settings.trainer.accelerator, settings.trainer.precision) == ("cpu", "32-true")
    assert settings.perf.backbone_precision == "32" and settings.loader.pin_memory is False
    assert (settings.final_eval.crf_backend, settings.final_eval.precision) == ("pydensecrf", "32-true")
    assert isinstance(settings.final_eval.crf_workers, int) and settings.final_eval.crf_workers >= 1
    assert settings.cache.batch_size == settings.batch_size
    evaluation = S.eval_settings(compose_config("eval", ["model_paths=[a.ckpt]"]))
    assert (evaluation.device, evaluation.crf_backend, evaluation.precision) == ("cpu", "pydensecrf",
                                                                                 "32-true")
    segment = S.segment_settings(compose_config("segment", REQUIRED["segment"] + ["crf_workers=auto"]))
    assert (segment.device, segment.crf_backend) == ("cpu", "pydensecrf") and segment.crf_workers >= 1
    nothing_auto = [v for v in OmegaConf.to_container(OmegaConf.structured(settings)).values() if v == "auto"]
    assert not nothing_auto


def test_trainer_gpu_says_auto_like_the_others():
    for name in ("default", "gpu", "ddp"):
        assert compose_config("train", [f"trainer={name}"]).trainer.precision == "auto"


def test_trainer_arguments_the_schema_does_not_list_go_through_extra():
    settings = train_settings(["experiment=demo", "+trainer.gradient_clip_val=0.5", "trainer.devices=1"])
    assert settings.trainer.extra == {"gradient_clip_val": 0.5} and settings.trainer.devices == 1


def test_a_null_section_is_typed_when_set_whole():
    settings = train_settings(["experiment=demo", "dataset.train_crop_source={crop_type:random,ratio:0.25}"])
    assert settings.dataset.train_crop_source == S.CropSource("random", 0.25)
    _, line = settings_or_error("train", ["experiment=demo", "dataset.train_crop_source={crop_typ:five}"])
    assert line == ("unknown config key 'dataset.train_crop_source.crop_typ'; "
                    "dataset.train_crop_source holds crop_type, ratio")


def test_the_library_gets_dataclasses_not_hydra_configs():
    settings = train_settings(["experiment=demo"])
    assert isinstance(settings, S.TrainSettings) and isinstance(settings.trainer, S.TrainerSettings)
    assert isinstance(settings.loss, S.LossConfig) and not OmegaConf.is_config(settings.model)


def test_defaults_live_in_the_schema_only():
    """The entry YAMLs choose groups and Hydra's own settings; no setting is declared twice."""
    for name in S.SCHEMAS:
        text = yaml.safe_load((S.__file__.replace("settings.py", f"configs/{name}.yaml")).__str__()
                              and open(S.__file__.replace("settings.py", f"configs/{name}.yaml")).read())
        assert set(text) - {"defaults", "hydra", "model_paths"} == set(), name


def test_bare_strings_of_list_settings_are_one_element_lists():
    crop = S.crop_settings(compose_config("crop", ["datasets=cityscapes"]))
    assert crop.datasets == ["cityscapes"] and crop.crop_types == ["five"]
    _, line = settings_or_error("crop", ["crop_types=[six]"])
    assert line == "crop_types=['six'] is not allowed: each entry of crop_types must be one of five, random"


def test_crop_entry_point_reads_a_bare_data_set_name_as_one(tmp_path):
    data = write_cityscapes_layout(tmp_path / "data", n_train=2, n_val=1, size=(32, 48))
    out = run_cli([f"data_dir={data}", "datasets=cityscapes", "num_workers=0", "progress=false"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "cityscapes_five_crop_0.5/train: 2 images" in out.stdout


def test_a_bad_setting_leaves_no_output_folder(tmp_path, entry_point):
    """Hydra makes no run folder and no log file: the settings are checked first."""
    out = tmp_path / "run"
    proc = entry_point("train_segmentation.py", "experiment=demo", f"output_dir={out}",
                       "final_eval.crf_backend=torhc")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: final_eval.crf_backend=torhc is not allowed: final_eval.crf_backend must be one of auto, "
        "pydensecrf, torch"]
    assert not out.exists()


def test_a_run_records_the_resolved_settings_and_opens_its_log_once_started(tmp_path):
    """config.yaml holds the values the run used (no auto left); the log file is the run's own."""
    from smooseg.train.train import train

    data = write_cityscapes_layout(tmp_path / "data", n_train=4, n_val=2, size=(32, 64), seed=0)
    out = tmp_path / "run"
    settings = train_settings([
        "experiment=demo", "model=dino_vits16", "model.pretrained=false", "res=32", "eval_res=32",
        "batch_size=2", "num_workers=0", "logger=none", "max_steps=2", "val_check_interval=2",
        "trainer=default", "trainer.enable_progress_bar=false", "final_eval.crf_workers=auto",
        f"data_dir={data}", f"output_dir={out}"])
    train(settings)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == settings.trainer.precision
    assert saved["perf"]["backbone_precision"] == S.backbone_precision("auto", settings.trainer.precision)
    assert saved["trainer"]["accelerator"] in ("cpu", "gpu")
    assert isinstance(saved["loader"]["pin_memory"], bool)
    assert isinstance(saved["final_eval"]["crf_workers"], int) and saved["cache"]["batch_size"] == 2
    assert "auto" not in yaml.safe_dump(saved).replace("strategy: auto", "")
    assert "Total estimated model params size" in (out / "train_segmentation.log").read_text()  # Lightning's
    # records of the run reach its log file
