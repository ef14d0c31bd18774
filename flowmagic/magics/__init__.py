"""The IPython extension: ``%%step``, ``%%params`` and ``%flow``, a thin layer over the engine."""
