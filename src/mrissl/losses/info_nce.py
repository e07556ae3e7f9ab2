"""Symmetric InfoNCE (CLIP-style), BrainMVP's modality-aware contrastive loss.

For L2-normalised embeddings ``f_i`` and ``g_i`` of two views of sample ``i`` (BrainMVP eqs. 4
and 5), the other samples of the batch being the negatives:

    L_{f→g} = −(1/B) Σ_i log( exp(f_i·g_i/τ) / Σ_j exp(f_i·g_j/τ) )
    L_CL    = ½ (L_{f→g} + L_{g→f})

Both directions are cross-entropies over the rows of one ``B × B`` logit matrix and its
transpose, computed with log-sum-exp in float32; nothing of size ``B × B × E`` is formed.
Extra negatives (a queue of past embeddings, MoCo-style) are appended to the candidates of
both directions. With ``gather_distributed=True`` the candidates are the embeddings of every
process and each process's labels are offset by the samples of the lower ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrissl._checks import check_bool, check_number
from mrissl._settings import values_checked
from mrissl.distributed import all_gather, all_reduce, gather_sizes, is_distributed, rank
from mrissl.losses._common import (
    check_features,
    check_same_shape,
    compute_dtype,
    l2_normalize,
    no_autocast,
    raise_if_not_finite,
)

__all__ = ["InfoNCELoss", "info_nce"]


def _check_temperature(temperature: float | torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a number or a one-element tensor, got shape "
                f"{tuple(temperature.shape)}"
            )
        # reading a tensor's value synchronises with its device: a value check (opt-in).
        # InfoNCELoss keeps a learnable τ positive by construction (exp of log τ, clamped).
        if values_checked() and not bool(temperature.detach() > 0):
            raise ValueError(f"temperature must be > 0, got {temperature.item()}")
    else:
        check_number(temperature, "temperature", low=0, low_open=True)


def info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.1,
    symmetric: bool = True,
    negatives: torch.Tensor | None = None,
    normalize: bool = True,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """InfoNCE between paired embeddings, symmetric by default (BrainMVP eqs. 4 and 5; CLIP).

    Row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are a positive pair; every other row of the other
    view (and every row of ``negatives``) is a negative. The loss is the mean over samples of
    the cross-entropy of the logits ``z_a_i·z_b_j / τ``, averaged over both directions when
    ``symmetric``. Memory is ``O(B²)`` (plus ``O(B·K)`` for ``K`` extra negatives).

    Args:
        z_a: ``(B, E)`` embeddings of the first view (BrainMVP: ``f``, cross-modal filled).
        z_b: ``(B, E)`` embeddings of the second view (BrainMVP: ``g``, template filled).
        temperature: τ > 0, a number or a one-element tensor (a learnable temperature).
        symmetric: average ``z_a → z_b`` and ``z_b → z_a`` (CLIP, BrainMVP eq. 5); ``False``
            gives ``z_a → z_b`` only.
        negatives: optional ``(K, E)`` extra negatives, candidates in both directions, for
            example a queue of embeddings from earlier batches (pass them detached).
        normalize: L2-normalize ``z_a``, ``z_b`` and ``negatives`` first (cosine similarity). With
            ``False`` the dot products of the given embeddings are used.
        gather_distributed: use every process's samples as candidates. The value and the
            (DDP-averaged) gradients are those of one process holding the whole batch.

    Returns:
        The scalar loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: naming the argument, for shapes that differ or are not ``(B, E)``,
            ``negatives`` of another width, a number ``temperature <= 0``; with the value checks
            on (``mrissl.set_checks``) also a tensor ``temperature <= 0`` and NaN or Inf.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(8, 32, generator=g)
        >>> aligned = info_nce(a, a + 0.01 * torch.randn(8, 32, generator=g))
        >>> unrelated = info_nce(a, torch.randn(8, 32, generator=g))
        >>> bool(aligned < unrelated), bool(unrelated > 1.0)
        (True, True)
    """
    _check_temperature(temperature)
    check_bool(symmetric, "symmetric")
    check_bool(normalize, "normalize")
    check_bool(gather_distributed, "gather_distributed")
    return _info_nce(
        z_a,
        z_b,
        temperature=temperature,
        symmetric=symmetric,
        negatives=negatives,
        normalize=normalize,
        gather_distributed=gather_distributed,
    )


def _info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    symmetric: bool,
    negatives: torch.Tensor | None,
    normalize: bool,
    gather_distributed: bool,
) -> torch.Tensor:
    """[`info_nce`][mrissl.losses.info_nce] for a validated configuration (tensors checked)."""
    check_features(z_a, "z_a", ndim=2)
    check_features(z_b, "z_b", ndim=2)
    check_same_shape(z_a, z_b, "z_a", "z_b")
    if negatives is not None:
        check_features(negatives, "negatives", ndim=2)
        if negatives.shape[1] != z_a.shape[1]:
            raise ValueError(
                f"negatives must have the embedding width of z_a and z_b ({z_a.shape[1]}), got "
                f"shape {tuple(negatives.shape)}"
            )

    dtype = compute_dtype(z_a, z_b, *(() if negatives is None else (negatives,)))
    with no_autocast(z_a):
        x, y = z_a.to(dtype), z_b.to(dtype)
        extra = None if negatives is None else negatives.to(dtype)
        if normalize:
            # cosines at any magnitude: the norms are taken of rows scaled to max |x| = 1
            x, y = l2_normalize(x, -1), l2_normalize(y, -1)
            extra = None if extra is None else l2_normalize(extra, -1)
        tau = (
            temperature.to(device=x.device, dtype=dtype).reshape(())
            if isinstance(temperature, torch.Tensor)
            else temperature
        )
        inv_tau = 1.0 / tau

        distributed = gather_distributed and is_distributed()
        n_local = x.shape[0]
        if distributed:
            sizes = gather_sizes(n_local, device=x.device)
            x_all, y_all = all_gather(x, sizes=sizes), all_gather(y, sizes=sizes)
            offset, n_total = sum(sizes[: rank()]), sum(sizes)
        else:
            x_all, y_all, offset, n_total = x, y, 0, n_local
        labels = torch.arange(offset, offset + n_local, device=x.device)

        def _candidates(keys: torch.Tensor) -> torch.Tensor:
            return keys if extra is None else torch.cat([keys, extra])

        # BrainMVP eq. 4: −log softmax of the positive among all candidates, summed over rows
        logits_ab = (x @ _candidates(y_all).T) * inv_tau
        loss = F.cross_entropy(logits_ab, labels, reduction="sum")
        if symmetric:  # BrainMVP eq. 5
            if extra is None and not distributed:
                logits_ba = logits_ab.T
            else:
                logits_ba = (y @ _candidates(x_all).T) * inv_tau
            loss = 0.5 * (loss + F.cross_entropy(logits_ba, labels, reduction="sum"))
        loss = (all_reduce(loss) if distributed else loss) / n_total
    return raise_if_not_finite(loss, z_a=z_a, z_b=z_b, negatives=negatives)


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE as a module, with an optional learnable temperature.

    Holds the configuration (validated once here) and the temperature parameter, and computes
    [`info_nce`][mrissl.losses.info_nce] with them.

    Args:
        temperature: τ > 0; the initial value when learnable.
        learnable_temperature: learn ``log τ`` as a parameter (CLIP). τ is then clamped to at
            least ``min_temperature`` (CLIP clamps the logit scale ``1/τ`` at 100).
        gather_distributed: use every process's samples as negatives, with gradients.
        symmetric: average both directions (default) or use ``z_a → z_b`` only.
        normalize: L2-normalize the embeddings first.
        min_temperature: lower bound of a learnable τ.

    Attributes:
        log_temperature: the ``nn.Parameter`` ``log τ`` when learnable, else ``None``.

    Raises:
        TypeError: for a non-bool flag or a non-number temperature.
        ValueError: for a temperature or ``min_temperature`` that is not positive and finite;
            ``forward`` raises as [`info_nce`][mrissl.losses.info_nce].

    Examples:
        >>> loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
        >>> g = torch.Generator().manual_seed(0)
        >>> f, g_ = torch.randn(2, 16, 128, generator=g)  # (B, E) each
        >>> loss = loss_fn(f, g_)
        >>> loss.backward()
        >>> round(loss_fn.temperature.item(), 4), loss_fn.log_temperature.grad is not None
        (0.07, True)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        learnable_temperature: bool = False,
        gather_distributed: bool = False,
        symmetric: bool = True,
        normalize: bool = True,
        min_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        check_number(temperature, "temperature", low=0, low_open=True)
        check_number(min_temperature, "min_temperature", low=0, low_open=True)
        check_bool(learnable_temperature, "learnable_temperature")
        check_bool(gather_distributed, "gather_distributed")
        check_bool(symmetric, "symmetric")
        check_bool(normalize, "normalize")
        self.log_temperature: nn.Parameter | None = None
        self._temperature = float(temperature)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.gather_distributed = gather_distributed
        self.symmetric = symmetric
        self.normalize = normalize
        self.min_temperature = float(min_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """The current τ as a 0-d tensor (differentiable when learnable)."""
        if self.log_temperature is None:
            return torch.tensor(self._temperature)
        return self.log_temperature.exp().clamp_min(self.min_temperature)

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the loss of ``z_a: (B, E)`` and ``z_b: (B, E)``, optional ``(K, E)`` negatives."""
        # a learnable τ is positive by construction (exp of log τ, clamped): nothing to check
        tau: float | torch.Tensor = (
            self._temperature if self.log_temperature is None else self.temperature
        )
        return _info_nce(
            z_a,
            z_b,
            temperature=tau,
            symmetric=self.symmetric,
            negatives=negatives,
            normalize=self.normalize,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        """The configuration, shown in ``repr(module)``."""
        learn = self.log_temperature is not None
        return (
            f"temperature={self.temperature.item():.4g}, learnable_temperature={learn}, "
            f"gather_distributed={self.gather_distributed}, symmetric={self.symmetric}"
        )
