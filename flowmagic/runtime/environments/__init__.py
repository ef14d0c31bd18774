"""Isolated per-step environments (``--pypi``, ``--conda``)."""
