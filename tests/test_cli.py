import subprocess
import sys
import textwrap

import pytest

from smooseg.cli import report_errors, translate_args
from smooseg.errors import SmoosegError
from smooseg.io import atomic_write


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["max_steps=5"], ["max_steps=5"]),
        (["--max_steps", "5"], ["max_steps=5"]),
        (["--max_steps=5"], ["max_steps=5"]),
        (["--dataset", "potsdam", "seed=3"], ["dataset=potsdam", "seed=3"]),
        (["--dropout"], ["dropout=true"]),
        (["--dropout", "--seed", "1"], ["dropout=true", "seed=1"]),
        (["--cfg", "job", "--seed", "1"], ["--cfg", "job", "seed=1"]),
        (["--config-name", "eval", "x=1"], ["--config-name", "eval", "x=1"]),
        (["-m", "seed=1,2"], ["-m", "seed=1,2"]),
        (["--multirun", "--lr", "-1"], ["--multirun", "lr=-1"]),
    ],
)
def test_translate_args(argv, expected):
    assert translate_args(argv) == expected


def test_report_errors_exits_2_with_one_line(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(
        """
        from smooseg.cli import report_errors
        from smooseg.errors import SmoosegError

        @report_errors
        def main():
            raise SmoosegError("data_dir 'x' not found: set data_dir=...")

        main()
        """
    ))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: data_dir 'x' not found: set data_dir=..."]


def test_ctrl_c_ends_with_one_line_and_status_130(capsys):
    @report_errors
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        interrupted()
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["error: interrupted"]


def test_report_errors_passes_other_results():
    assert report_errors(lambda x: x + 1)(1) == 2


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(ValueError):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise ValueError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_smooseg_error_is_runtime_error():
    assert issubclass(SmoosegError, RuntimeError)


def test_the_value_quoted_back_is_the_one_hydra_took():
    """Hydra applies the last of two overrides of one key; the error line quotes that one."""
    from smooseg.cli import typed_value

    assert typed_value("batch_size", ["batch_size=2", "seed=1", "batch_size=abc"], "?") == "abc"
    assert typed_value("loss.temperature", ["+loss.temperature=0.5"], "?") == "0.5"
    assert typed_value("res", ["seed=1"], "fallback") == "fallback"
