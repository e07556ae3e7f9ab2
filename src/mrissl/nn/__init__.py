"""3D vision-transformer building blocks for multi-modal volumes.

Patch embedding, position embedding, patchify, token gathering and intermediate-feature capture.

This is the bottom layer of mrissl: it imports nothing from the other subpackages.
"""

from mrissl.nn.intermediates import (
    IntermediateFeatures,
    capture_intermediates,
    find_blocks,
    pyramid_levels,
)
from mrissl.nn.patch_embed import PatchEmbed3d
from mrissl.nn.patches import grid_size, patchify, unpatchify
from mrissl.nn.pos_embed import sincos_pos_embed_3d
from mrissl.nn.tokens import gather_tokens, scatter_tokens

__all__ = [
    "IntermediateFeatures",
    "PatchEmbed3d",
    "capture_intermediates",
    "find_blocks",
    "gather_tokens",
    "grid_size",
    "patchify",
    "pyramid_levels",
    "scatter_tokens",
    "sincos_pos_embed_3d",
    "unpatchify",
]
