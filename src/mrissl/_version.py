"""The single place where mrissl's version is written."""

__version__ = "0.1.0.dev0"
