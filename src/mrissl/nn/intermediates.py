"""Capture the outputs of chosen transformer blocks during a forward pass.

E-MIM's pyramid Barlow Twins loss compares token features of the full and the masked view at
several encoder depths (eq. 7, blocks 3, 6, 9 and 12 of 12).
[`capture_intermediates`][mrissl.nn.capture_intermediates] collects those features from a
model the user already has, without changing its code, through forward hooks that it removes
when the ``with`` block ends, also after an exception.

Blocks are numbered from 1 as in E-MIM: block ``k`` is the output of the ``k``-th transformer
block, before any final norm. Negative numbers count from the end (``-1`` is the last block).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import nn

__all__ = ["IntermediateFeatures", "capture_intermediates", "find_blocks", "pyramid_levels"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.Identity, nn.RMSNorm)


def pyramid_levels(depth: int = 12, levels: int = 4) -> list[int]:
    """Return the 1-based block numbers of E-MIM's pyramid levels.

    Level ``l = 1 … L`` is block ``ceil(depth · l / L)``: for 12 blocks and 4 levels the
    paper's blocks 3, 6, 9 and 12. When ``levels`` does not divide ``depth`` the blocks are
    rounded up, so the last level is always the last block.

    ``L = 1`` gives the last block (``12/L · l = 12``, eqs. 5-6). E-MIM's Table IV labels that
    row "1 (input)" instead, which its equations do not define (the input has no token
    features to correlate before the patch embedding); mrissl follows the equations. For a
    level on the patch embedding's output, capture it yourself and pass it as one more level.

    Args:
        depth: number of transformer blocks in the encoder.
        levels: number of pyramid levels ``L``, at most ``depth``.

    Returns:
        ``levels`` strictly increasing block numbers in ``[1, depth]``.

    Raises:
        ValueError: if ``depth`` or ``levels`` is not positive or ``levels > depth``.

    Examples:
        >>> pyramid_levels(12, 4)
        [3, 6, 9, 12]
        >>> pyramid_levels(24, 3)
        [8, 16, 24]
    """
    for name, value in (("depth", depth), ("levels", levels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if levels > depth:
        raise ValueError(f"levels must be at most depth ({depth}), got {levels}")
    return [math.ceil(depth * level / levels) for level in range(1, levels + 1)]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the transformer blocks of ``model`` in order.

    Looks for a ``blocks`` sequence (timm ``VisionTransformer``, MONAI ``ViT`` and
    ``MaskedAutoEncoderViT``, most MAE code) or a ``layers`` sequence. Normalisation layers at
    the end of the sequence are not blocks: MONAI's ``MaskedAutoEncoderViT`` keeps its final
    ``LayerNorm`` inside ``blocks``, and block 12 of it means the 12th transformer block.

    Args:
        model: the encoder, or a model holding it as ``model.blocks``.

    Returns:
        The blocks, the first being block 1.

    Raises:
        TypeError: if the model has no ``blocks`` or ``layers`` sequence of modules.

    Examples:
        >>> from monai.networks.nets import MaskedAutoEncoderViT
        >>> mae = MaskedAutoEncoderViT(in_channels=1, img_size=16, patch_size=8, num_layers=3,
        ...                            hidden_size=24, mlp_dim=48, num_heads=2)
        >>> len(mae.blocks), len(find_blocks(mae))  # the final LayerNorm is not a block
        (4, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for attr in ("blocks", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            blocks = list(seq)
            while blocks and isinstance(blocks[-1], _NORMS):
                blocks.pop()
            if blocks:
                return blocks
    raise TypeError(
        f"model ({type(model).__name__}) has no `blocks` or `layers` sequence of transformer "
        f"blocks; pass the sequence itself with capture_intermediates(..., blocks=model.<name>)"
    )


class IntermediateFeatures(Sequence[torch.Tensor]):
    """The captured block outputs, one tensor per requested block, in the order asked for.

    Filled while the model runs inside
    [`capture_intermediates`][mrissl.nn.capture_intermediates]; reading an entry before the
    forward pass has reached that block raises ``RuntimeError``. Indexing follows the order of
    ``indices`` (entry 0 is the first block asked for), and slicing gives a list.

    Examples:
        >>> blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> with capture_intermediates(blocks, [2, 1], blocks=list(blocks)) as feats:
        ...     _ = blocks(torch.randn(3, 5, 4))
        >>> feats.indices, len(feats), tuple(feats[0].shape)
        ([2, 1], 2, (3, 5, 4))
    """

    def __init__(self, indices: Sequence[int], num_prefix_tokens: int) -> None:
        self.indices = list(indices)
        self.num_prefix_tokens = num_prefix_tokens
        self._features: dict[int, torch.Tensor] = {}

    def _store(self, index: int, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"block {index} returned {type(output).__name__}; expected a tensor "
                f"(or a tuple whose first item is the token tensor)"
            )
        if index in self._features and not _in_backward():
            raise RuntimeError(
                f"block {index} ran twice inside one capture_intermediates block; use one "
                f"`with capture_intermediates(...)` per forward pass (for example one for the "
                f"full view and one for the masked view)"
            )
        if self.num_prefix_tokens:
            output = output[:, self.num_prefix_tokens :]
        self._features[index] = output

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        """Return the features of the ``i``-th requested block (not block number ``i``)."""
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        index = self.indices[i]
        if index not in self._features:
            raise RuntimeError(
                f"block {index} has not run yet: call the model inside the "
                f"`with capture_intermediates(...)` block before reading the features"
            )
        return self._features[index]

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._features.items()}
        return f"IntermediateFeatures(indices={self.indices}, captured={shapes})"


def _in_backward() -> bool:
    # Activation checkpointing re-runs blocks during backward; that is not a second forward.
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _detect_prefix_tokens(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    # MONAI ViT / MaskedAutoEncoderViT keep a class token in `cls_token`
    if getattr(model, "classification", True) and isinstance(
        getattr(model, "cls_token", None), torch.Tensor
    ):
        return 1
    return 0


@contextmanager
def capture_intermediates(
    model: nn.Module,
    indices: Sequence[int],
    *,
    blocks: Sequence[nn.Module] | None = None,
    num_prefix_tokens: int | None = None,
) -> Iterator[IntermediateFeatures]:
    """Collect the outputs of chosen blocks while ``model`` runs inside the ``with`` block.

    Args:
        model: a timm ``VisionTransformer`` (for example with
            [`PatchEmbed3d`][mrissl.nn.PatchEmbed3d]), a MONAI ``ViT`` or
            ``MaskedAutoEncoderViT``, or any model with a ``blocks`` (or ``layers``) sequence.
        indices: 1-based block numbers as in E-MIM, for example ``pyramid_levels(12, 4)``;
            negative numbers count from the end. No repeats.
        blocks: the block sequence to hook, when it is not ``model.blocks``.
        num_prefix_tokens: tokens to strip from the front of every output (class and register
            tokens). ``None`` reads ``model.num_prefix_tokens`` (timm) or finds MONAI's class
            token; ``0`` keeps every token.

    Yields:
        An [`IntermediateFeatures`][mrissl.nn.IntermediateFeatures] sequence, filled during
        the forward pass: entry ``i`` is the ``(B, N, E)`` output of block ``indices[i]``
        with the prefix tokens removed. Features keep their autograd graph, so losses on
        them train the encoder.

    Raises:
        TypeError: if no block sequence is found.
        ValueError: if an index is 0, out of range or repeated.
        RuntimeError: if a block runs twice in one ``with`` block.

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> from mrissl.nn import PatchEmbed3d
        >>> vit = VisionTransformer(img_size=32, patch_size=8, in_chans=2, embed_dim=24,
        ...                         depth=4, num_heads=2, num_classes=0,
        ...                         embed_layer=PatchEmbed3d)
        >>> with capture_intermediates(vit, pyramid_levels(4, 2)) as feats:
        ...     _ = vit(torch.randn(3, 2, 32, 32, 32))
        >>> [tuple(f.shape) for f in feats]
        [(3, 64, 24), (3, 64, 24)]
    """
    seq = list(blocks) if blocks is not None else find_blocks(model)
    depth = len(seq)
    resolved: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"indices must be ints, got {type(i).__name__} {i!r}")
        if i == 0 or not -depth <= i <= depth:
            raise ValueError(
                f"indices must be block numbers in 1..{depth} (1-based, as in E-MIM) or "
                f"-{depth}..-1, got {i}"
            )
        resolved.append(i if i > 0 else depth + 1 + i)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"indices must not repeat a block, got {list(indices)}")
    if num_prefix_tokens is None:
        num_prefix_tokens = _detect_prefix_tokens(model)
    elif num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")

    features = IntermediateFeatures(resolved, num_prefix_tokens)
    handles = []
    try:
        for index in resolved:

            def hook(_m: nn.Module, _args: Any, output: Any, index: int = index) -> None:
                features._store(index, output)

            handles.append(seq[index - 1].register_forward_hook(hook))
        yield features
    finally:
        for handle in handles:
            handle.remove()
