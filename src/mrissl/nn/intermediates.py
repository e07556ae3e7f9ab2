"""Capture the outputs of chosen transformer blocks or encoder stages during a forward pass.

[`capture_intermediates`][mrissl.nn.capture_intermediates] collects the token features of
E-MIM's pyramid levels (eq. 7, blocks 3, 6, 9 and 12 of 12) from a model the user already has,
through forward hooks removed when the ``with`` block ends. Blocks are numbered from 1 as in
E-MIM; feature maps of hierarchical encoders come back as ``(B, N, C)`` tokens with their grid.
Which models are found: [timm][timm], [Other models][other-models] and
[Swin, UNETR and CNN encoders][swin-unetr-and-cnn-encoders].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import nn

from mrissl._checks import check_number

__all__ = ["IntermediateFeatures", "capture_intermediates", "find_blocks", "pyramid_levels"]

# Wrappers that keep their encoder in one attribute: MONAI SwinUNETR (`swinViT`), UNETR (`vit`).
_ENCODER_ATTRS = ("swinViT", "vit")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.Identity, nn.RMSNorm)


def pyramid_levels(depth: int = 12, levels: int = 4) -> list[int]:
    """Return the 1-based block numbers of E-MIM's pyramid levels.

    Level ``l = 1 … L`` is block ``ceil(depth · l / L)``: for 12 blocks and 4 levels the
    paper's blocks 3, 6, 9 and 12. When ``levels`` does not divide ``depth`` the blocks are
    rounded up, so the last level is always the last block.

    ``L = 1`` gives the last block (``12/L · l = 12``, eqs. 5-6; E-MIM's Table IV labels that
    row "1 (input)", which its equations do not define).

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
    check_number(depth, "depth", low=1, integer=True)
    check_number(levels, "levels", low=1, integer=True)
    if levels > depth:
        raise ValueError(f"levels must be at most depth ({depth}), got {levels}")
    return [math.ceil(depth * level / levels) for level in range(1, levels + 1)]


def _swin_stages(model: nn.Module) -> list[nn.Module]:
    # MONAI SwinTransformer keeps stage k as the only entry of `layers<k>`
    stages = []
    for k in range(1, 10):
        seq = getattr(model, f"layers{k}", None)
        if not isinstance(seq, nn.ModuleList) or len(seq) == 0:
            break
        stages.append(seq[0])
    return stages


def _find_encoder(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    for attr in ("blocks", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            blocks = list(seq)
            while blocks and isinstance(blocks[-1], _NORMS):
                blocks.pop()
            if blocks:
                return model, blocks
    stages = _swin_stages(model)
    if stages:
        return model, stages
    for attr in _ENCODER_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and inner is not model:
            try:
                return _find_encoder(inner)
            except TypeError:
                pass
    raise TypeError(
        f"model ({type(model).__name__}) has no `blocks` or `layers` sequence of transformer "
        f"blocks and no MONAI Swin stages `layers1..layers4`; name the modules to capture with "
        f"capture_intermediates(..., blocks=[model.<stage1>, ...]) or "
        f'blocks=["<stage1>", ...] (names as in model.named_modules())'
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the transformer blocks (or encoder stages) of ``model`` in order.

    Looks, in this order, for:

    * a ``blocks`` sequence (timm ``VisionTransformer``, MONAI ``ViT`` and
      ``MaskedAutoEncoderViT``, most MAE code) or a ``layers`` sequence. Normalisation layers at
      the end of the sequence are not blocks: MONAI's ``MaskedAutoEncoderViT`` keeps its final
      ``LayerNorm`` inside ``blocks``, and block 12 of it means the 12th transformer block;
    * MONAI ``SwinTransformer`` stages ``layers1``, ``layers2``, … (each stage, with its patch
      merging, is one level: 4 for the default ``SwinUNETR``);
    * the same inside ``model.swinViT`` (MONAI ``SwinUNETR``) or ``model.vit`` (MONAI
      ``UNETR``).

    Args:
        model: the encoder, or a model holding it.

    Returns:
        The blocks, the first being block 1.

    Raises:
        TypeError: if none of the above is found.

    Examples:
        >>> from monai.networks.nets import MaskedAutoEncoderViT, SwinUNETR
        >>> mae = MaskedAutoEncoderViT(in_channels=1, img_size=16, patch_size=8, num_layers=3,
        ...                            hidden_size=24, mlp_dim=48, num_heads=2)
        >>> len(mae.blocks), len(find_blocks(mae))  # the final LayerNorm is not a block
        (4, 3)
        >>> swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
        >>> find_blocks(swin)[0] is swin.swinViT.layers1[0]
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _find_encoder(model)[1]


class IntermediateFeatures(Sequence[torch.Tensor]):
    """The captured outputs, one ``(B, N, E)`` tensor per requested block, in the order asked for.

    Filled while the model runs inside
    [`capture_intermediates`][mrissl.nn.capture_intermediates]; reading an entry before the
    forward pass has reached that block raises ``RuntimeError``. Indexing follows the order of
    ``indices`` (entry 0 is the first block asked for), and slicing gives a list.

    A block whose output is a ``(B, C, D, H, W)`` feature map (a Swin stage, a CNN stage) is
    stored as ``(B, D·H·W, C)`` tokens in raster order (depth slowest, width fastest), and
    ``grids`` holds its ``(D, H, W)``; a block that already returns ``(B, N, E)`` tokens has
    ``None`` there (a ViT's grid is its patch grid, see [`grid_size`][mrissl.nn.grid_size]).

    Attributes:
        indices: the 1-based block numbers, in the order asked for.
        num_prefix_tokens: tokens stripped from the front of token outputs.

    Examples:
        >>> blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> with capture_intermediates(blocks, [2, 1], blocks=list(blocks)) as feats:
        ...     _ = blocks(torch.randn(3, 5, 4))
        >>> feats.indices, len(feats), tuple(feats[0].shape), feats.grids
        ([2, 1], 2, (3, 5, 4), [None, None])
    """

    def __init__(self, indices: Sequence[int], *, num_prefix_tokens: int) -> None:
        self.indices = list(indices)
        self.num_prefix_tokens = num_prefix_tokens
        self._features: dict[int, torch.Tensor] = {}
        self._grids: dict[int, tuple[int, int, int] | None] = {}

    def _store(self, index: int, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.ndim not in (3, 5):
            got = (
                f"shape {tuple(output.shape)}"
                if isinstance(output, torch.Tensor)
                else type(output).__name__
            )
            raise TypeError(
                f"block {index} returned {got}; expected (B, N, E) tokens or a (B, C, D, H, W) "
                f"feature map (or a tuple whose first item is one)"
            )
        if index in self._features and not _in_backward():
            raise RuntimeError(
                f"block {index} ran twice inside one capture_intermediates block; use one "
                f"`with capture_intermediates(...)` per forward pass (for example one for the "
                f"full view and one for the masked view)"
            )
        grid: tuple[int, int, int] | None = None
        if output.ndim == 5:
            D, H, W = output.shape[2:]
            grid = (D, H, W)
            output = output.flatten(2).transpose(1, 2)  # (B, C, D, H, W) -> (B, D·H·W, C)
        elif self.num_prefix_tokens:
            output = output[:, self.num_prefix_tokens :]
        self._features[index] = output
        self._grids[index] = grid

    def _check_ran(self, index: int) -> None:
        if index not in self._features:
            raise RuntimeError(
                f"block {index} has not run yet: call the model inside the "
                f"`with capture_intermediates(...)` block before reading the features"
            )

    @property
    def grids(self) -> list[tuple[int, int, int] | None]:
        """``(D, H, W)`` of each entry that came from a feature map, ``None`` for token outputs."""
        for index in self.indices:
            self._check_ran(index)
        return [self._grids[index] for index in self.indices]

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        """Return the features of the ``i``-th requested block (not block number ``i``)."""
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        index = self.indices[i]
        self._check_ran(index)
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


def _resolve_blocks(model: nn.Module, blocks: object) -> list[nn.Module]:
    container = isinstance(blocks, (nn.Sequential, nn.ModuleList))
    if not container and (isinstance(blocks, (str, nn.Module)) or not isinstance(blocks, Iterable)):
        raise TypeError(
            f"blocks must be a sequence of modules or module names, got one "
            f"{type(blocks).__name__}; wrap it in a list"
        )
    resolved = []
    items: Iterable[object] = blocks  # type: ignore[assignment]
    for i, block in enumerate(items):
        if isinstance(block, str):
            try:
                block = model.get_submodule(block)
            except AttributeError as err:
                raise ValueError(
                    f"blocks[{i}] = {block!r} is not a submodule of {type(model).__name__}; "
                    f"use a name from model.named_modules(), for example 'swinViT.layers1.0'"
                ) from err
        if not isinstance(block, nn.Module):
            raise TypeError(
                f"blocks[{i}] must be a torch.nn.Module or a module name, got "
                f"{type(block).__name__}"
            )
        resolved.append(block)
    if not resolved:
        raise ValueError("blocks must name at least one module, got an empty sequence")
    return resolved


@contextmanager
def capture_intermediates(
    model: nn.Module,
    indices: Sequence[int] | None = None,
    *,
    blocks: Sequence[nn.Module | str] | None = None,
    num_prefix_tokens: int | None = None,
) -> Iterator[IntermediateFeatures]:
    """Collect the outputs of chosen blocks while ``model`` runs inside the ``with`` block.

    Args:
        model: a timm ``VisionTransformer`` (for example with
            [`PatchEmbed3d`][mrissl.nn.PatchEmbed3d]), a MONAI ``ViT``,
            ``MaskedAutoEncoderViT``, ``UNETR``, ``SwinUNETR`` or ``SwinTransformer``, any
            model with a ``blocks`` (or ``layers``) sequence, or any model at all with
            ``blocks=`` (see [`find_blocks`][mrissl.nn.find_blocks]).
        indices: 1-based block numbers as in E-MIM, for example ``pyramid_levels(12, 4)``;
            negative numbers count from the end. No repeats. ``None``: every block.
        blocks: the modules to hook, when they are not found automatically: module objects or
            their names in ``model.named_modules()`` (``"encoder.stage1"``). Each one's output
            is a level: ``(B, N, E)`` tokens or a ``(B, C, D, H, W)`` feature map.
        num_prefix_tokens: tokens to strip from the front of every token output (class and
            register tokens). ``None`` reads ``model.num_prefix_tokens`` (timm) or finds MONAI's
            class token; ``0`` keeps every token. Feature maps have none.

    Yields:
        An [`IntermediateFeatures`][mrissl.nn.IntermediateFeatures] sequence, filled during
        the forward pass: entry ``i`` is the ``(B, N, E)`` output of block ``indices[i]``
        with the prefix tokens removed, or its ``(B, C, D, H, W)`` feature map as
        ``(B, D·H·W, C)`` tokens in raster order, with ``(D, H, W)`` in ``grids[i]``.
        Features keep their autograd graph, so losses on them train the encoder.

    Raises:
        TypeError: if no block sequence is found, or a block returns something else than
            tokens or a 5-D feature map.
        ValueError: if an index is 0, out of range or repeated, or a block name is unknown.
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

        MONAI, Swin and CNN encoders: [Swin, UNETR and CNN encoders][swin-unetr-and-cnn-encoders].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if blocks is not None:
        encoder, seq = model, _resolve_blocks(model, blocks)
    else:
        encoder, seq = _find_encoder(model)
    depth = len(seq)
    if indices is None:
        indices = range(1, depth + 1)
    resolved: list[int] = []
    for i in indices:
        check_number(i, "indices", integer=True)
        if i == 0 or not -depth <= i <= depth:
            raise ValueError(
                f"indices must be block numbers in 1..{depth} (1-based, as in E-MIM) or "
                f"-{depth}..-1, got {i}"
            )
        resolved.append(i if i > 0 else depth + 1 + i)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"indices must not repeat a block, got {list(indices)}")
    if num_prefix_tokens is None:
        num_prefix_tokens = _detect_prefix_tokens(encoder)
    else:
        check_number(num_prefix_tokens, "num_prefix_tokens", low=0, integer=True)

    features = IntermediateFeatures(resolved, num_prefix_tokens=num_prefix_tokens)
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
