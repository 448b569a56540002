"""grapes_dask: exact, out-of-core GREAT2 radial grey-level analysis of micro-CT particles on Dask.

Public API (see the README):

- :func:`open_volume`, :func:`convert`, :func:`volume_info`, :func:`read_spacing` (``grapes_dask.io``)
- :func:`make_phantom` (``grapes_dask.synthetic``)
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("grapes-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

from ._errors import GrapesInputError  # noqa: E402

__all__ = ["GrapesInputError", "__version__"]
