"""Where a task's attempts run: the local fork server (local.py) or a Dask cluster (dask.py, remote.py)."""
