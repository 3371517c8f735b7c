"""loraplex client SDK (no torch import)."""

__version__ = "0.1.0"
