"""mrissl: composable PyTorch components for self-supervised pretraining on multi-modal 3D MRI.

Import the piece you need from its module, for example ``from mrissl.nn import PatchEmbed3d``.
This top-level module only carries the version, so importing it is cheap.
"""

from mrissl._version import __version__

__all__ = ["__version__"]
