"""``python -m grapes_dask`` runs the ``grapes-dask`` command."""

from .cli import main

if __name__ == "__main__":  # worker processes started by spawn re-import this module
    main()
