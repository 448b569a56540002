"""Progress of long computations, on standard error.

On a terminal a tqdm bar; otherwise (a log file, a batch job's output, a pipe) a plain line
at every tenth of the work at most every 10 seconds, and one at the end, so that redirected
logs stay readable. Three sources feed the same display: a plain counter, dask's local
schedulers (:func:`dask_callback`) and a distributed cluster (:func:`distributed_progress`).
"""

from __future__ import annotations

import sys
import time

__all__ = ["Reporter", "dask_callback", "distributed_progress"]

_PLAIN_MIN_SECONDS = 10.0


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Reporter:
    """One progress display.

    Parameters
    ----------
    desc : str
        What is being done (``"pass 1 (statistics)"``).
    unit : str
        What is counted (``"task"``, ``"block"``).
    stream : file, optional
        Default ``sys.stderr``; a terminal gets a bar, anything else plain lines.
    """

    def __init__(self, desc: str, unit: str = "task", stream=None):
        self.desc, self.unit = desc, unit
        self.stream = sys.stderr if stream is None else stream
        self._bar = None
        self._t0 = time.perf_counter()
        self._last_line = -1.0
        self._last_tenth = -1
        self._done = self._total = 0
        self._closed = False

    def update_to(self, done: int, total: int) -> None:
        """Show that `done` of `total` units are finished."""
        done, total = int(done), max(int(total), 0)
        self._done, self._total = done, total
        if _is_tty(self.stream):
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream,
                                 dynamic_ncols=True, leave=True)
            if self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._bar.n)
            return
        tenth = (10 * done // total) if total else 10
        now = time.perf_counter()
        if tenth > self._last_tenth and (now - self._last_line >= _PLAIN_MIN_SECONDS or self._last_line < 0):
            if done < total:
                self._line(f"{self.desc}: {done}/{total} {self.unit}s ({100 * done // max(total, 1)}%)")
                self._last_line, self._last_tenth = now, tenth

    def close(self) -> None:
        """End the display (a last line with the elapsed time when not on a terminal)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not _is_tty(self.stream):
            self._line(f"{self.desc}: {self._done}/{self._total} {self.unit}s done in "
                       f"{time.perf_counter() - self._t0:.1f} s")

    def _line(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except ValueError:  # closed stream at interpreter exit
            pass


def dask_callback(desc: str, unit: str = "task"):
    """A dask callback (local schedulers) that reports finished tasks to a :class:`Reporter`."""
    from dask.callbacks import Callback

    class _Cb(Callback):
        def _start_state(self, dsk, state):
            self._rep = Reporter(desc, unit)
            self._n = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self._rep.update_to(0, self._n)

        def _posttask(self, key, result, dsk, state, worker_id):
            self._rep.update_to(len(state["finished"]), self._n)

        def _finish(self, dsk, state, errored):
            if not errored:
                self._rep.update_to(self._n, self._n)
            self._rep.close()

    return _Cb()


def distributed_progress(futures, desc: str) -> None:
    """Report the progress of `futures` (and every task they depend on) until they finish."""
    from distributed.diagnostics.progressbar import TextProgressBar

    rep = Reporter(desc)

    class _Bar(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            rep.update_to(all - remaining, all)

        def _draw_stop(self, **kwargs):
            rep.close()

    _Bar(list(futures), interval="200ms", complete=True)
    rep.close()
