"""kmclust.cli.progress: a tqdm bar on a terminal, log lines otherwise, nothing after its block."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from kmclust.cli import progress


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_bar_is_redrawn_and_closed_with_the_block(monkeypatch) -> None:
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with progress("sweep") as bar:
        bar(3, 10, "(k=5 written)")
        bar(10, 10, "(k=6 written)")
    text = err.getvalue()
    last = text.split("\r")[-1]
    assert "sweep" in last and "10/10" in last and "(k=6 written)" in last
    assert "3/10" in text and "(k=5 written)" in text
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn with \r
    print("error: something", file=sys.stderr)  # as run_main after a failure
    assert err.getvalue().splitlines()[-1] == "error: something"


def test_on_a_terminal_an_error_closes_the_bar_before_the_error_line(monkeypatch) -> None:
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(RuntimeError), progress("sweep") as bar:
        bar(1, 4, "(k=2 written)")
        raise RuntimeError("boom")
    closed = err.getvalue()
    assert closed.endswith("\n")
    print("error: boom", file=sys.stderr)
    assert err.getvalue() == closed + "error: boom\n"


def test_on_a_terminal_log_lines_go_above_the_bar(monkeypatch) -> None:
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    handler = logging.StreamHandler(err)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress("sweep") as bar:
            bar(1, 4, "(k=2 written)")
            logging.getLogger("kmclust.test").warning("a cell failed; trying it once more")
            bar(4, 4, "(k=3 written)")
    finally:
        root.removeHandler(handler)
    lines = [line.split("\r")[-1] for line in err.getvalue().splitlines()]
    assert "a cell failed; trying it once more" in lines
    assert "4/4" in lines[-1] and "(k=3 written)" in lines[-1]


def test_without_a_terminal_each_call_is_one_log_line(capsys, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kmclust.cli"), progress("sweep") as bar:
        bar(3, 10, "(k=5 written)")
        bar(10, 10, "(k=6 written)")
    messages = [r.getMessage() for r in caplog.records if r.name == "kmclust.cli"]
    assert len(messages) == 2
    assert messages[0].startswith("sweep: 3/10 cells in ") and messages[0].endswith("(k=5 written)")
    assert messages[1].startswith("sweep: 10/10 cells in ")
    assert capsys.readouterr().err == ""  # no bar, no carriage returns
