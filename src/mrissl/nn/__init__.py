"""3D vision-transformer building blocks for multi-modal volumes.

Patch embedding, position embedding, patchify, token gathering, intermediate-feature capture,
and the glue that makes timm's ``VisionTransformer`` work on volumes.

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
from mrissl.nn.pos_embed import resample_pos_embed_3d, sincos_pos_embed_3d
from mrissl.nn.timm_vit import PatchEmbed3dFactory, adapt_timm_vit
from mrissl.nn.tokens import gather_tokens, scatter_tokens

__all__ = [
    "IntermediateFeatures",
    "PatchEmbed3d",
    "PatchEmbed3dFactory",
    "adapt_timm_vit",
    "capture_intermediates",
    "find_blocks",
    "gather_tokens",
    "grid_size",
    "patchify",
    "pyramid_levels",
    "resample_pos_embed_3d",
    "scatter_tokens",
    "sincos_pos_embed_3d",
    "unpatchify",
]
