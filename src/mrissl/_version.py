"""The single place where mrissl's version is written."""

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
