"""``python -m grapes_dask`` runs the ``grapes-dask`` command."""

from .cli import main

main()
