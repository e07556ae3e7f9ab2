"""Select and restore tokens for token-dropping (MAE-style) encoders.

A masked autoencoder runs its encoder on the kept tokens only and gives its decoder the full
sequence back, with a mask token wherever a token was dropped. Both steps are index operations
on the token axis; the indices come from the mask (``mrissl.masking.keep_indices``), never from
a second random draw (DESIGN.md).

``gather_tokens(x, keep)`` picks ``keep`` along the token axis; ``scatter_tokens(y, keep, L,
fill=mask_token)`` is its right inverse: it puts the kept tokens back at their positions in a
sequence of length ``L`` and fills the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mrissl._checks import as_index, check_index, check_number, check_tensor

__all__ = ["gather_tokens", "scatter_tokens"]


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``(B, K)`` index over the trailing feature dimensions of ``like``."""
    shape = (*index.shape, *like.shape[2:])
    return index.view(*index.shape, *([1] * (like.ndim - 2))).expand(shape)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick tokens by position, separately for every sample.

    Args:
        x: ``(B, L, ...)`` token sequences (for example ``(B, L, E)`` features or ``(B, L)``
            values).
        index: ``(B, K)`` int64 positions in ``[0, L)``, for example the kept tokens of a mask.

    Returns:
        ``(B, K, ...)`` with ``out[b, k] = x[b, index[b, k]]``. Gradients flow back to ``x``.

    Raises:
        TypeError: if ``index`` is not an int64 tensor.
        ValueError: if the batch sizes differ, or (with the value checks on) an index is out
            of range; without them the gather kernel stops on an out-of-range index.

    Examples:
        >>> x = torch.arange(12.0).view(2, 3, 2)
        >>> gather_tokens(x, torch.tensor([[2], [0]]))
        tensor([[[4., 5.]],
        <BLANKLINE>
                [[6., 7.]]])
    """
    check_tensor(x, "x", ndim=range(2, 8))
    index = as_index(index, "index", x.device)
    check_index(index, "index", x.shape[0], x.shape[1])
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    return torch.gather(x, 1, _expand_index(index, x))


def scatter_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    length: int,
    *,
    fill: torch.Tensor | float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Put tokens back at their positions in a longer sequence and fill the other positions.

    This undoes [`gather_tokens`][mrissl.nn.gather_tokens]:
    ``gather_tokens(scatter_tokens(y, i, L), i)`` is ``y``.
    With a learnable mask token as ``fill`` it is the first step of an MAE decoder.

    Args:
        x: ``(B, K, ...)`` tokens, for example the encoder output of the kept tokens.
        index: ``(B, K)`` int64 positions in ``[0, length)``, without repeats within a sample.
        length: ``L``, the length of the full sequence.
        fill: the value of every position not in ``index``: a number, or a tensor (or a list
            of numbers) that broadcasts to one token ``x.shape[2:]`` (a mask token of shape
            ``(E,)`` or ``(1, 1, E)``). Gradients reach a tensor ``fill`` from every filled
            position.

    Returns:
        ``(B, length, ...)`` in the dtype of ``x`` (``fill`` is cast to it).

    Raises:
        TypeError: if ``index`` is not an int64 tensor.
        ValueError: if shapes disagree, ``length`` is smaller than ``K``, or (with the value
            checks on) an index is out of range.

    Examples:
        >>> y = torch.ones(1, 2, 3)
        >>> scatter_tokens(y, torch.tensor([[3, 0]]), length=4, fill=torch.zeros(3))
        tensor([[[1., 1., 1.],
                 [0., 0., 0.],
                 [0., 0., 0.],
                 [1., 1., 1.]]])
    """
    check_tensor(x, "x", ndim=range(2, 8))
    check_number(length, "length", low=0, integer=True)
    if length < x.shape[1]:
        raise ValueError(
            f"length must be at least the number of tokens given ({x.shape[1]}), got {length}"
        )
    index = as_index(index, "index", x.device)
    check_index(index, "index", x.shape[0], length)
    if index.shape[1] != x.shape[1]:
        raise ValueError(
            f"index must have one position per token of x: x has {x.shape[1]} tokens "
            f"(shape {tuple(x.shape)}), index has shape {tuple(index.shape)}"
        )
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    out_shape = (x.shape[0], length, *x.shape[2:])
    if isinstance(fill, list | tuple):  # a mask token written as a list of numbers
        fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if isinstance(fill, torch.Tensor):
        token_shape = tuple(x.shape[2:])
        try:
            torch.broadcast_shapes(fill.shape, (1, 1, *token_shape))  # type: ignore[no-untyped-call]
        except RuntimeError as err:
            raise ValueError(
                f"fill must broadcast to one token of shape {token_shape}, "
                f"got shape {tuple(fill.shape)}"
            ) from err
        base = fill.to(dtype=x.dtype, device=x.device).expand(out_shape)
    elif isinstance(fill, bool) or not isinstance(fill, int | float):
        raise TypeError(
            f"fill must be a number, a tensor or a list of numbers, got {type(fill).__name__}"
        )
    else:
        base = x.new_full((1,) * len(out_shape), float(fill)).expand(out_shape)
    # out-of-place scatter: gradients reach both x and (at the untouched positions) fill
    return base.scatter(1, _expand_index(index, x), x)
