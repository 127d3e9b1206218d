"""Data set specs: each fact declared once, palettes with one colour per class, no module outside
the specs testing a data set's name, the model layer free of the data readers."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from smooseg.data.datasets import DatasetInfo, class_names, n_classes_of
from smooseg.data.registry import dataset_names, dataset_spec
from smooseg.data.spec import lookup_table, map_ids
from smooseg.errors import SmoosegError
from smooseg.viz import colormap

SPECS = [dataset_spec(name) for name in dataset_names()]


def test_builtin_specs_are_found():
    assert set(dataset_names()) >= {"cityscapes", "cocostuff27", "potsdam", "directory"}
    named = ("cityscapes", "cocostuff27", "potsdam")
    assert [spec.n_classes for spec in map(dataset_spec, named)] == [27, 27, 3]
    assert dataset_spec("directory").n_classes is None
    assert dataset_spec("potsdam").eval_res == 224 and dataset_spec("cityscapes").eval_res == 320
    assert dataset_spec("potsdamraw") is dataset_spec("potsdam")        # the reference's name for it
    with pytest.raises(SmoosegError, match="unknown data set 'mars' .*choose one of cityscapes"):
        dataset_spec("mars")


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_no_two_classes_share_a_colour(spec):
    colors = spec.colors
    assert len(colors) == len(spec.class_names)
    assert len(set(colors)) == len(colors), [
        (name, color) for name, color in spec.classes if colors.count(tuple(color)) > 1]
    assert (0, 0, 0) not in colors                                       # black is ignore / unmatched


@pytest.mark.parametrize("name", dataset_names())
def test_palettes_stay_distinct_with_extra_clusters(name):
    n = (dataset_spec(name).n_classes or 6) + 5
    palette = [tuple(c) for c in colormap(name, n)]
    assert len(set(palette)) == n and (0, 0, 0) not in palette


def test_cityscapes_pole_and_polegroup_differ():
    colors = dict(dataset_spec("cityscapes").classes)
    assert colors["pole"] == (153, 153, 153) and colors["polegroup"] != colors["pole"]


def test_label_tables_by_hand():
    table = lookup_table({7: 0, 8: 0, 26: 4})
    ids = np.array([[7, 8, 26], [0, 255, 300]])
    assert map_ids(ids, table).tolist() == [[0, 0, 4], [-1, -1, -1]]
    cityscapes = dataset_spec("cityscapes").label_table
    assert cityscapes[7] == 0 and cityscapes[33] == 26 and cityscapes[6] == cityscapes[34] == -1
    coco = dataset_spec("cocostuff27").label_table
    names = dataset_spec("cocostuff27").class_names
    assert names[coco[0]] == "person" and names[coco[181]] == "solid" and coco[182] == -1


def test_class_counts_and_names():
    assert n_classes_of("cityscapes") == 27 and n_classes_of("directory", n_clusters=4) == 4
    assert n_classes_of("directory", n_classes=3) == 3
    with pytest.raises(SmoosegError, match="dataset.n_clusters=4 is for data sets without labels; potsdam "
                                           r"has 3 classes: drop it"):
        n_classes_of("potsdam", n_clusters=4)
    with pytest.raises(SmoosegError, match="potsdam has 3 classes, not dataset.n_classes=5"):
        n_classes_of("potsdam", n_classes=5)
    with pytest.raises(SmoosegError, match="dir_dataset_n_classes is not set"):
        n_classes_of("directory", key="dir_dataset_n_classes")
    assert class_names("potsdam") == list(dataset_spec("potsdam").class_names)
    assert class_names("directory", 2) == ["class_0", "class_1"]
    assert class_names("cityscapes", 3) == ["class_0", "class_1", "class_2"]   # another count: no names


def test_dataset_info_fills_the_spec_defaults():
    potsdam = DatasetInfo(3, name="potsdam")
    assert potsdam.eval_res == 224 and potsdam.class_names[2] == "trees and vegetation"
    assert DatasetInfo(27, name="cityscapes", eval_res=64).eval_res == 64
    assert DatasetInfo(5, name="somebody_elses").eval_res == 320                # unknown names: the default


def _name_tests(path, names):
    """``(line, text)`` of every comparison in ``path`` against a string that is a data set name."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                    found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
            if any(isinstance(a, ast.Constant) and a.value in names for a in node.args):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_tests_a_data_set_name():
    names = set(dataset_names()) | {alias for spec in SPECS for alias in spec.aliases}
    package = ROOT / "smooseg"
    offenders = {str(path.relative_to(ROOT)): hits for path in sorted(package.rglob("*.py"))
                 if "sets" not in path.relative_to(package).parts[:2]
                 for hits in [_name_tests(path, names)] if hits}
    assert offenders == {}


def test_model_layer_does_not_load_the_data_readers():
    code = ("import sys, smooseg.model.checkpoints, smooseg.model.net; "
            "print(sorted(m for m in sys.modules if m.startswith('smooseg.data')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_each_builtin_data_set_is_one_module_and_one_yaml():
    modules = {path.stem for path in (ROOT / "smooseg/data/sets").glob("*.py") if path.stem != "__init__"}
    assert modules == {spec.name for spec in SPECS if spec.reader.__module__.startswith("smooseg.data.sets")}
    yamls = {path.stem for path in (ROOT / "smooseg/configs/dataset").glob("*.yaml")}
    assert modules <= yamls
    assert Path(ROOT / "smooseg/data/datasets.py").read_text().count("\n") < 200
