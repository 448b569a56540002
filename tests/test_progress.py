"""Progress display (grapes_dask._progress): a bar on a terminal, plain lines elsewhere."""

import io

import dask
import dask.array as da

from grapes_dask._progress import Reporter, dask_callback


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    rep = Reporter("pass 1", stream=out)
    for i in range(101):
        rep.update_to(i, 100)
    rep.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first line at once, then at most one per 10 s (this loop takes microseconds), then the end
    assert lines[0] == "pass 1: 0/100 tasks (0%)"
    assert len(lines) == 2 and lines[-1].startswith("pass 1: 100/100 tasks done in ")


def test_a_bar_on_a_terminal():
    out = _Terminal()
    rep = Reporter("pass 2", stream=out)
    for i in range(11):
        rep.update_to(i, 10)
    rep.close()
    text = out.getvalue()
    assert "\r" in text and "pass 2" in text and "10/10" in text


def test_dask_callback_counts_every_task(capsys):
    x = da.ones((40, 40), chunks=10).sum()
    with dask_callback("sum"):
        assert dask.compute(x, scheduler="threads")[0] == 1600
    err = capsys.readouterr().err.splitlines()
    n = int(err[-1].split("/")[1].split()[0])
    assert err[-1] == f"sum: {n}/{n} tasks done in " + err[-1].rsplit("in ", 1)[1] and n >= 16
