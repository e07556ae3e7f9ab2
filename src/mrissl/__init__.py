"""mrissl: composable PyTorch components for self-supervised pretraining on multi-modal 3D MRI.

Import the piece you need from its module, for example ``from mrissl.nn import PatchEmbed3d``.
This top-level module carries the version and the value-checks switch (``set_checks``,
``get_checks``, ``checks``); importing it is cheap (no torch).
"""

from mrissl._settings import checks, get_checks, set_checks
from mrissl._version import __version__

__all__ = ["__version__", "checks", "get_checks", "set_checks"]
