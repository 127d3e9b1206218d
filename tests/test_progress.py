"""Progress bars outside a terminal: whole lines, never a carriage-return update."""

import io

from smooseg.progress import PlainLines, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_pipe_gets_whole_lines_and_the_last_state():
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="eval", file=stream, mininterval=0):
        pass
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("eval:   0%") and lines[-1].startswith("eval: 100%") and "5/5" in lines[-1]
    assert all(line.strip() for line in lines)  # no empty line from tqdm's closing newline


def test_lines_are_rationed_by_the_interval():
    stream = io.StringIO()
    for _ in PlainLines(range(1000), desc="segment", file=stream):  # default interval: 30 s
        pass
    assert len(stream.getvalue().splitlines()) == 2  # the first and the last


def test_a_terminal_keeps_the_live_bar():
    stream = Terminal()
    bar = progress_bar(range(3), file=stream)
    assert not isinstance(bar, PlainLines)
    list(bar)
    assert "\r" in stream.getvalue()
