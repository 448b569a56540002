"""Errors raised for bad user input, worded for whoever reads them.

Every user-facing check raises :class:`GrapesInputError` with a message that names the
offending input and says how to fix it. A fix that is a parameter is written as a placeholder
``{name}`` in the message and given as a keyword argument, so that the same error reads
``exclude_labels=[1519]`` to a Python user and ``--exclude-labels 1519`` on the command line,
which prints the message (no traceback) and exits with status 2::

    raise GrapesInputError("skip it with {exclude_labels}, or raise {memory_limit}",
                           exclude_labels=[1519], memory_limit=None)

A value of ``None`` names the parameter alone; ``True`` is a flag (``overwrite=True`` /
``--overwrite``); :class:`Alt` gives two wordings where a parameter is not enough (a numpy
call for the API, a command for the CLI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["GrapesInputError", "GrapesDataError", "GrapesWorkerError", "GrapesInputWarning", "Alt", "cli_flag"]

# keyword -> command-line option, where the flag is not simply "--" + name with dashes
_FLAGS = {
    "black_border": "--no-black-border",
    "check_labels": "--no-check-labels",
    "shape": "--size",
    "n_states": "--states",
}
_SPACE_SEPARATED = {"spacing", "shape"}  # options that take one value per axis


@dataclass(frozen=True)
class Alt:
    """Two wordings of one part of a message: for the Python API and for the command line."""

    api: str
    cli: str


def cli_flag(name: str) -> str:
    """The command-line option of an API keyword (``exclude_labels`` -> ``--exclude-labels``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _render_api(name, value) -> str:
    if isinstance(value, Alt):
        return value.api
    if value is None:
        return name
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


def _render_cli(name, value) -> str:
    if isinstance(value, Alt):
        return value.cli
    flag = cli_flag(name)
    if value is None or value is True:
        return flag
    if value is False and flag.startswith("--no-"):  # a switch that turns the default off
        return flag
    if isinstance(value, (list, tuple)):
        sep = " " if name in _SPACE_SEPARATED else ","
        return f"{flag} {sep.join(str(v) for v in value)}"
    return f"{flag} {value}"


class GrapesInputError(ValueError):
    """Bad input from the user (a path, an array, a parameter).

    Parameters
    ----------
    message : str
        What is wrong and how to fix it; ``{name}`` stands for the parameter ``name`` of
        `options` (other braces are left as they are).
    **options
        Parameter name -> value to show (``None``: the name alone; :class:`Alt`: two wordings).

    Notes
    -----
    ``str(err)`` is the Python wording; :meth:`render` with ``"cli"`` gives the command-line
    wording. Subclasses ``ValueError`` so that callers that already catch it keep working.
    """

    def __init__(self, message: str, **options):
        self.template = str(message)
        self.options = options
        super().__init__(self.render("api"))

    def __reduce__(self):
        # pickled whole (template, options and the subclass' fields), so that an error raised in
        # a task on a distributed worker reaches the client as it was raised, CLI wording included
        return (_rebuild, (type(self), self.template, self.options, self._fields()))

    def _fields(self) -> dict:
        return {}

    def renamed(self, **names) -> "GrapesInputError":
        """The same error with parameters renamed (``dataset="grey_dataset"``), for a caller
        whose own parameter carries the value on to the one that raised."""
        template = re.sub(r"\{(\w+)\}", lambda m: "{" + names.get(m.group(1), m.group(1)) + "}", self.template)
        err = GrapesInputError(template, **{names.get(k, k): v for k, v in self.options.items()})
        err.__cause__ = self.__cause__
        return err

    def render(self, style: str = "api") -> str:
        """The message for ``"api"`` (keywords) or ``"cli"`` (command-line options)."""
        if not self.options:
            return self.template
        fmt = _render_cli if style == "cli" else _render_api

        def sub(m):
            key = m.group(1)
            return fmt(key, self.options[key]) if key in self.options else m.group(0)

        return re.sub(r"\{(\w+)\}", sub, self.template)


def _rebuild(cls, template, options, fields):
    err = cls.__new__(cls)
    err.template, err.options = template, dict(options)
    err.__dict__.update(fields)
    Exception.__init__(err, err.render("api"))
    return err


class GrapesDataError(GrapesInputError):
    """Stored input data that cannot be read: a corrupt, truncated, empty or unreadable chunk or file.

    Raised by the task that reads it (the volume is never read ahead), so it stops the run at
    the first damaged chunk met; ``grapes-dask info --check`` (:func:`grapes_dask.io.check_chunks`)
    lists all of them. The command line prints its message and exits with status 2, as for any
    :class:`GrapesInputError`.

    Parameters
    ----------
    message : str
        What is damaged and how to fix it, as for :class:`GrapesInputError`.
    array : str
        The input as the user gave it (``OUT/labels.zarr``, ``scan.h5::/entry/data``).
    chunk : tuple of int, optional
        Index of the chunk in the array's chunk grid, ``(z, y, x)`` (more axes for arrays with
        leading axes); None when the format has no chunk grid we can name (a TIFF strip).
    path : str, optional
        Absolute path of the damaged file (a chunk or shard file, or the TIFF/HDF5 file).
    detail : str, optional
        What is wrong with the file, in a few words (``"is empty (0 bytes)"``), for lists of
        damaged chunks.
    **options
        Parameter name -> value, as for :class:`GrapesInputError`.
    """

    def __init__(self, message: str, *, array: str, chunk: tuple | None = None, path: str | None = None,
                 detail: str | None = None, **options):
        self.array = array
        self.chunk = None if chunk is None else tuple(int(i) for i in chunk)
        self.path = path
        self.detail = detail
        super().__init__(message, **options)

    def _fields(self) -> dict:
        return {"array": self.array, "chunk": self.chunk, "path": self.path, "detail": self.detail}


class GrapesWorkerError(GrapesInputError):
    """A task that killed its dask worker every time it ran: most probably it ran out of memory.

    Distributed reruns the task of a worker that died on another (or a restarted) worker, and
    gives up after ``distributed.scheduler.allowed-failures`` deaths with ``KilledWorker``;
    :func:`grapes_dask.cluster.worker_died_error` turns that into this error, which names the
    task (pass 1 block or pass 2 region, with its voxel ranges) and the settings that give a
    task more memory. A settings problem, not a bug, so the command line prints it as a user
    error (status 2, no traceback without ``--verbose``).

    Parameters
    ----------
    message : str
        As for :class:`GrapesInputError`.
    task : str, optional
        The dask key of the task.
    **options
        Parameter name -> value, as for :class:`GrapesInputError`.
    """

    def __init__(self, message: str, *, task: str | None = None, **options):
        self.task = task
        super().__init__(message, **options)

    def _fields(self) -> dict:
        return {"task": self.task}


class GrapesInputWarning(UserWarning):
    """Input that is probably not what the user meant, analysed anyway (e.g. no particle at all).

    The command line turns it into an error: an output file of nothing is never what is wanted.
    """
