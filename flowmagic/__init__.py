"""flowmagic: Metaflow's model inside the Jupyter notebook."""
from __future__ import annotations

__version__ = "0.1.0"
