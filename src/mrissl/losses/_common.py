"""Helpers shared by the loss modules (private).

Every loss runs its arithmetic in float32, or in float64 when an input is float64 (so that
``torch.autograd.gradcheck`` sees double precision), with autocast switched off: under bf16 or
fp16 autocast a matrix product would otherwise be recomputed in half precision.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from mrissl._checks import check_floating, check_tensor
from mrissl._settings import values_checked
from mrissl.distributed import all_reduce_

__all__: list[str] = []


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def no_autocast(x: torch.Tensor) -> AbstractContextManager[Any]:
    """A context that disables autocast on the device of ``x``."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def check_features(x: Any, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """A floating tensor with one of the allowed numbers of dimensions and no empty axis."""
    check_tensor(x, name, ndim=ndim)
    check_floating(x, name)
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    out: torch.Tensor = x
    return out


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both arguments when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def raise_if_not_finite(loss: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
    """Return ``loss`` if it is finite; otherwise raise naming the input that holds NaN or Inf.

    Runs only when the value checks are on (``mrissl.set_checks("values")``): checking the scalar
    loss rather than every input costs one host synchronisation and no pass over the data; NaN
    and Inf in an input always reach the loss. With the checks off it returns ``loss`` untouched.
    """
    if not values_checked() or bool(torch.isfinite(loss.detach()).all()):
        return loss
    for name, x in inputs.items():
        if x is not None and not bool(torch.isfinite(x.detach()).all()):
            bad = int((~torch.isfinite(x.detach())).sum())
            raise ValueError(
                f"{name} contains NaN or Inf ({bad} of {x.numel()} values, shape "
                f"{tuple(x.shape)}); the loss would be {loss.detach().flatten()[0].item()}"
            )
    raise ValueError(
        f"the loss is not finite ({loss.detach().flatten()[0].item()}) although its inputs "
        f"({', '.join(inputs)}) are: their values overflow float32"
    )


def max_abs_scale(
    x: torch.Tensor, dim: int | tuple[int, ...], *, across_processes: bool = False
) -> torch.Tensor:
    """The detached largest ``|x|`` along ``dim`` (kept), 1 where that is 0.

    Dividing by it before squaring keeps every square in ``[0, 1]``: the sums of squares of
    features around 1e30 no longer overflow float32 and those around 1e-30 no longer underflow.
    Detached, it is a constant to autograd; every quantity it rescales is scale-free (a unit
    vector, a correlation) or rescaled back, so values and gradients are those of the plain
    formula. NaN stays NaN (``NaN > 0`` is False, and ``x`` itself carries the NaN on).
    ``across_processes`` takes the maximum over the processes too, so that every process
    scales by the same numbers and sums over processes still add up.
    """
    x = x.detach()
    # max(amax, −amin) is max |x| without a temporary |x| (and faster than an inf-norm)
    s = torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())
    if across_processes:
        all_reduce_(s, "max")
    return torch.where(s > 0, s, torch.ones_like(s))


def inv_l2_norm(
    u: torch.Tensor,
    dim: int | tuple[int, ...],
    floor: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``1 / max(||u||_2, floor)`` along ``dim`` (kept), for ``u`` scaled to ``max |u| = 1``.

    ``reduce`` sums the squares over processes. A non-zero ``u`` has a norm of at least 1 (its
    largest entry is exactly ±1), so the clamp at 1/2 only touches all-zero rows, which stay 0
    after multiplying.
    """
    if reduce is None:
        norm = torch.linalg.vector_norm(u, dim=dim, keepdim=True)  # gradient 0, not NaN, at 0
    else:
        norm = reduce(u.square().sum(dim=dim, keepdim=True)).clamp_min(0.25).sqrt()
    norm = norm.clamp_min(0.5) if floor is None else torch.maximum(norm.clamp_min(0.5), floor)
    return norm.reciprocal()


def l2_normalize(
    x: torch.Tensor,
    dim: int | tuple[int, ...],
    eps: float = 0.0,
    *,
    scale: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` along ``dim``, without overflow or underflow in the norm.

    ``x`` is first divided by its largest absolute entry (``scale``, from ``max_abs_scale``
    unless given; the same on every process when ``reduce`` sums the squares over processes),
    so the sum of squares lies in ``[1, size]`` for a non-zero row and is 0 only for an
    all-zero row, which stays 0. With ``eps = 0`` this is the direction of ``x`` at any
    magnitude (cosine similarity); ``eps > 0`` keeps the meaning of a smallest norm in the
    units of ``x``.
    """
    s = max_abs_scale(x, dim) if scale is None else scale
    u = x / s
    return u * inv_l2_norm(u, dim, eps / s if eps > 0 else None, reduce)


def l2_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``||x||_2`` along ``dim`` (removed), without overflow or underflow; gradient 0 at 0."""
    s = max_abs_scale(x, dim)
    norm: torch.Tensor = torch.linalg.vector_norm(x / s, dim=dim) * s.squeeze(dim)
    return norm


def frobenius_sq_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a @ b^T||_F^2`` for ``a: (..., P, M)``, ``b: (..., Q, M)``, per leading index.

    The product is never formed when it is the larger object: ``||a b^T||_F^2`` equals
    ``sum((a^T a) ∘ (b^T b))`` with ``M × M`` Gram matrices, which costs ``M²(P + Q)`` instead
    of ``M·P·Q`` operations. For Barlow Twins with ``B = 256`` samples and ``D = 8192`` features
    that is 16 times less work and a ``256 × 256`` instead of an ``8192 × 8192`` matrix.
    """
    P, M, Q = a.shape[-2], a.shape[-1], b.shape[-2]
    if M * (P + Q) < P * Q:
        gram_a = a.mT @ a
        gram_b = b.mT @ b
        out: torch.Tensor = (gram_a * gram_b).sum(dim=(-2, -1))
        return out
    c = a @ b.mT
    # vector_norm needs no temporary of the size of c (its gradient at c = 0 is 0, not NaN)
    sum_sq: torch.Tensor = torch.linalg.vector_norm(c, dim=(-2, -1)).square()
    return sum_sq
