"""Collectives that carry gradients, shared by the losses and the meters.

A loss that needs the global batch (the negatives of InfoNCE, the batch statistics of Barlow
Twins) gathers or sums tensors across processes. ``torch.distributed.all_gather`` and
``all_reduce`` are not differentiable: the gathered copies of the other processes' tensors
carry no gradient, so each process trains on a different, partial loss. The functions here are
differentiable and follow one convention, the one of ``torch.distributed.nn``:

*   every process computes the **same** loss, the loss of one process holding the whole batch;
*   backward sums the gradients of that loss over the processes, so the gradient reaching each
    process's inputs is ``world_size ×`` the full-batch gradient; DistributedDataParallel divides
    the parameter gradients by ``world_size``, which leaves exactly the full-batch gradient.

When ``torch.distributed`` is not initialised (or runs one process) every function returns its
input, so the same code runs in one process and under DDP.
[`all_reduce_`][mrissl.distributed.all_reduce_] is the plain, in-place, non-differentiable
reduction the meters use for their state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from mrissl._checks import check_choice, check_tensor

__all__ = [
    "all_gather",
    "all_reduce",
    "all_reduce_",
    "broadcast_",
    "gather_sizes",
    "is_distributed",
    "rank",
    "world_size",
]

ReduceOp = Literal["sum", "mean", "max", "min"]
_OPS = ("sum", "mean", "max", "min")


def is_distributed(process_group: Any = None) -> bool:
    """Return whether ``torch.distributed`` is initialised with more than one process.

    Args:
        process_group: a process group; ``None`` is the default (world) group.

    Returns:
        ``True`` when collectives would exchange data with other processes.

    Examples:
        >>> is_distributed()  # a plain Python process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def world_size(process_group: Any = None) -> int:
    """Return the number of processes, ``1`` when ``torch.distributed`` is not initialised.

    Examples:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group)
    return 1


def rank(process_group: Any = None) -> int:
    """Return this process's rank, ``0`` when ``torch.distributed`` is not initialised.

    Examples:
        >>> rank()
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group)
    return 0


def gather_sizes(
    n: int, *, device: torch.device | None = None, process_group: Any = None
) -> list[int]:
    """Return the local batch size of every process, in rank order.

    Losses use it to place this process's samples in the gathered batch and to gather batches
    of unequal sizes. It is one small ``all_gather`` read on the host: the one host
    synchronisation of a loss with ``gather_distributed=True``
    ([Across processes][across-processes]).

    Args:
        n: this process's number of samples.
        device: where the exchanged counter lives; must be a device the backend supports
            (CUDA for NCCL). Defaults to CPU.
        process_group: a process group; ``None`` is the default group.

    Returns:
        ``world_size`` ints; ``[n]`` when not distributed.

    Examples:
        >>> gather_sizes(8)
        [8]
    """
    if not is_distributed(process_group):
        return [int(n)]
    local = torch.tensor([int(n)], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(sizes, local, group=process_group)
    return [int(s.item()) for s in sizes]


class _AllGather(torch.autograd.Function):
    """Concatenate every process's tensor along dim 0; backward sums the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
        me = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:me])
        ctx.length = sizes[me]
        longest = max(sizes)
        x = x.contiguous()
        if x.shape[0] < longest:  # collectives need equal shapes: pad, then trim
            pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
            x = torch.cat([x, pad])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every process computed the same loss from the gathered tensor; the gradient of this
        # process's slice is the sum of what every process's loss sends it.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.length], None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; backward sums the gradients the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_gather(
    tensor: torch.Tensor, *, sizes: Sequence[int] | None = None, process_group: Any = None
) -> torch.Tensor:
    """Concatenate the tensors of all processes along dim 0, with gradients.

    Processes may hold different numbers of samples (the last batch of an epoch); the other
    dimensions must agree. Gradients reach this process's ``tensor`` from the loss of every
    process (module docstring: the convention of ``torch.distributed.nn``).

    Args:
        tensor: ``(n, ...)`` this process's samples.
        sizes: every process's ``n`` in rank order, when already known (from
            [`gather_sizes`][mrissl.distributed.gather_sizes]); otherwise exchanged here.
        process_group: a process group; ``None`` is the default group.

    Returns:
        ``(sum(sizes), ...)``, rank 0's samples first; ``tensor`` itself when not distributed.

    Raises:
        TypeError: if ``tensor`` is not a tensor.
        ValueError: if ``tensor`` is a scalar or ``sizes`` does not match the processes.

    Examples:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> all_gather(x) is x  # one process: nothing to gather
        True
    """
    check_tensor(tensor, "tensor", ndim=range(1, 16))
    if not is_distributed(process_group):
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], device=tensor.device, process_group=process_group)
    sizes = [int(s) for s in sizes]
    me = dist.get_rank(process_group)
    if len(sizes) != dist.get_world_size(process_group) or sizes[me] != tensor.shape[0]:
        raise ValueError(
            f"sizes must hold one batch size per process "
            f"({dist.get_world_size(process_group)}) with this process's {tensor.shape[0]} at "
            f"index {me}, got {sizes}"
        )
    out: torch.Tensor = _AllGather.apply(tensor, sizes, process_group)
    return out


def all_reduce(
    tensor: torch.Tensor, op: Literal["sum", "mean"] = "sum", *, process_group: Any = None
) -> torch.Tensor:
    """Sum (or average) a tensor over all processes, with gradients.

    Out of place: ``tensor`` is left unchanged. Backward sums the gradients over the processes
    (module docstring).

    Args:
        tensor: any shape; the same shape on every process.
        op: ``"sum"`` or ``"mean"`` (the sum divided by the number of processes).
        process_group: a process group; ``None`` is the default group.

    Returns:
        The reduced tensor; ``tensor`` itself when not distributed.

    Raises:
        ValueError: if ``op`` is not ``"sum"`` or ``"mean"``.

    Examples:
        >>> x = torch.ones(3, requires_grad=True)
        >>> all_reduce(x, "mean") is x
        True
    """
    check_tensor(tensor, "tensor")
    check_choice(op, "op", ("sum", "mean"))  # a differentiable max or min is not offered
    if not is_distributed(process_group):
        return tensor
    out: torch.Tensor = _AllReduceSum.apply(tensor, process_group)
    return out / dist.get_world_size(process_group) if op == "mean" else out


def all_reduce_(
    tensor: torch.Tensor, op: ReduceOp = "sum", *, process_group: Any = None
) -> torch.Tensor:
    """Reduce a tensor over all processes in place, without gradients (for meters' state).

    A no-op when ``torch.distributed`` is not initialised or runs one process.

    Args:
        tensor: any shape, the same on every process; overwritten with the result.
        op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``. ``"mean"`` needs a floating tensor.
        process_group: a process group; ``None`` is the default group.

    Returns:
        ``tensor``, for chaining.

    Raises:
        ValueError: if ``op`` is not one of the four.
        TypeError: if ``op="mean"`` on an integer tensor.

    Examples:
        >>> counts = torch.tensor([3, 5])
        >>> all_reduce_(counts, "max")
        tensor([3, 5])
    """
    check_tensor(tensor, "tensor")
    check_choice(op, "op", _OPS)
    if op == "mean" and not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"op='mean' needs a floating-point tensor, got dtype {tensor.dtype}")
    if not is_distributed(process_group):
        return tensor
    reduce_op = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }[op]
    with torch.no_grad():
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(buf, op=reduce_op, group=process_group)
        if op == "mean":
            buf.div_(dist.get_world_size(process_group))
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, *, process_group: Any = None) -> torch.Tensor:
    """Overwrite ``tensor`` in place with the one of process ``src``, without gradients.

    A no-op when ``torch.distributed`` is not initialised or runs one process. The Barlow
    Twins loss uses it to agree on one reference sample across processes.

    Args:
        tensor: any shape, the same on every process.
        src: the global rank whose tensor every process receives.
        process_group: a process group; ``None`` is the default group.

    Returns:
        ``tensor``, for chaining.

    Examples:
        >>> broadcast_(torch.arange(3))
        tensor([0, 1, 2])
    """
    check_tensor(tensor, "tensor")
    if not is_distributed(process_group):
        return tensor
    with torch.no_grad():
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buf, src=src, group=process_group)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor
