"""An offline, deterministic, multi-contrast 3D head phantom built from MR signal equations.

[`synthetic_phantom`][mrissl.data.synthetic_phantom] draws one random head: tissue maps made
from smooth implicit shapes on a coordinate grid, then one image per modality from the
spin-echo or inversion-recovery signal equation with published relaxation times, partial-volume
smoothing, a smooth multiplicative bias field and Rician noise. It needs no download, runs in
well under a second at 128³ on a CPU, and the same seed always gives the same head.
[`PhantomDataset`][mrissl.data.PhantomDataset] serves a reproducible collection of them.

The phantom is what mrissl's tests, examples and ``mrissl collapse-check --demo`` run on. It is
a stand-in with the statistics that matter there (several registered contrasts with the right
tissue ordering, smooth anatomy with fine cortical detail, background, lesions), not an
anatomical atlas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mrissl._checks import check_number, to_triple
from mrissl.data._phantom_anatomy import LABEL_NAMES, cosine_fields, tissue_labels
from mrissl.modalities import canonical_modalities

__all__ = [
    "PHANTOM_LABELS",
    "PHANTOM_MODALITIES",
    "PHANTOM_SEQUENCES",
    "PHANTOM_TISSUES",
    "PhantomDataset",
    "PulseSequence",
    "Tissue",
    "synthetic_phantom",
]


class Tissue(NamedTuple):
    """MR properties of one phantom tissue.

    Attributes:
        pd: relative proton density (free water = 1).
        t1: longitudinal relaxation time T1 in ms (before contrast).
        t2: transverse relaxation time T2 in ms.
    """

    pd: float
    t1: float
    t2: float


class PulseSequence(NamedTuple):
    """Acquisition parameters of one phantom modality.

    Attributes:
        kind: ``"spin_echo"`` or ``"inversion_recovery"``.
        tr: repetition time TR in ms.
        te: echo time TE in ms.
        ti: inversion time TI in ms; ``None`` for spin echo, and for inversion recovery
            ``None`` means "the TI that nulls CSF".
        contrast: whether a gadolinium agent shortens T1 in enhancing tissue.
    """

    kind: Literal["spin_echo", "inversion_recovery"]
    tr: float
    te: float
    ti: float | None = None
    contrast: bool = False


PHANTOM_LABELS: Mapping[int, str] = MappingProxyType(dict(enumerate(LABEL_NAMES)))
"""Label value → tissue name of the phantom's label map: 0 background, 1 csf, 2 grey_matter,
3 white_matter, 4 fat, 5 skin, 6 bone, 7 oedema, 8 enhancing_tumour, 9 necrosis."""
_L = {name: value for value, name in PHANTOM_LABELS.items()}

PHANTOM_TISSUES: Mapping[str, Tissue] = MappingProxyType(
    {
        "background": Tissue(pd=0.0, t1=1.0, t2=1.0),
        "csf": Tissue(pd=1.0, t1=2569.0, t2=329.0),
        "grey_matter": Tissue(pd=0.86, t1=833.0, t2=83.0),
        "white_matter": Tissue(pd=0.77, t1=500.0, t2=70.0),
        "fat": Tissue(pd=1.0, t1=350.0, t2=70.0),
        "skin": Tissue(pd=0.77, t1=500.0, t2=70.0),
        "bone": Tissue(pd=0.0, t1=1.0, t2=1.0),
        "oedema": Tissue(pd=0.90, t1=1000.0, t2=150.0),
        "enhancing_tumour": Tissue(pd=0.90, t1=1000.0, t2=110.0),
        "necrosis": Tissue(pd=0.95, t1=2000.0, t2=250.0),
    }
)
"""Tissue name → MR properties (1.5 T); the [phantom guide][how-a-head-is-drawn]
gives the source of each value."""

PHANTOM_SEQUENCES: Mapping[str, PulseSequence] = MappingProxyType(
    {
        "t1": PulseSequence("spin_echo", tr=500.0, te=15.0),
        "t1ce": PulseSequence("spin_echo", tr=500.0, te=15.0, contrast=True),
        "t2": PulseSequence("spin_echo", tr=4000.0, te=100.0),
        "pd": PulseSequence("spin_echo", tr=3000.0, te=15.0),
        "flair": PulseSequence("inversion_recovery", tr=9000.0, te=120.0),
    }
)
"""Modality → acquisition parameters (typical 1.5 T clinical protocols)."""

PHANTOM_MODALITIES: tuple[str, ...] = tuple(PHANTOM_SEQUENCES)
"""The modalities the phantom can produce, in canonical names."""

# Gadolinium: longitudinal relaxivity of gadopentetate in plasma at 1.5 T, about
# 4.1 L·mmol⁻¹·s⁻¹ (Rohrer et al., Invest. Radiol. 40:715, 2005), at an assumed tissue
# concentration of 0.5 mmol/L in the enhancing rim.
_GD_R1_PER_MS = 4.1e-3  # L·mmol⁻¹·ms⁻¹
_GD_CONCENTRATION = 0.5  # mmol/L


def _signal_table(modalities: Sequence[str]) -> torch.Tensor:
    """Noise-free signal of every tissue in every modality: ``(C, K)`` float64."""
    tissues = [PHANTOM_TISSUES[PHANTOM_LABELS[k]] for k in range(len(PHANTOM_LABELS))]
    pd = torch.tensor([t.pd for t in tissues], dtype=torch.float64)
    t1 = torch.tensor([t.t1 for t in tissues], dtype=torch.float64)
    t2 = torch.tensor([t.t2 for t in tissues], dtype=torch.float64)
    rows = []
    for name in modalities:
        seq = PHANTOM_SEQUENCES[name]
        t1_seq = t1.clone()
        if seq.contrast:
            # R1 = R1,0 + r1·[Gd]: relaxation rates of independent mechanisms add.
            k = _L["enhancing_tumour"]
            t1_seq[k] = 1.0 / (1.0 / t1[k] + _GD_R1_PER_MS * _GD_CONCENTRATION)
        if seq.kind == "spin_echo":
            # S = PD·(1 − exp(−TR/T1))·exp(−TE/T2)
            s = pd * (1 - torch.exp(-seq.tr / t1_seq)) * torch.exp(-seq.te / t2)
        else:
            ti = seq.ti
            if ti is None:
                # the TI where 1 − 2·exp(−TI/T1) + exp(−TR/T1) = 0 for CSF
                t1_csf = PHANTOM_TISSUES["csf"].t1
                ti = t1_csf * math.log(2.0 / (1.0 + math.exp(-seq.tr / t1_csf)))
            # S = PD·|1 − 2·exp(−TI/T1) + exp(−TR/T1)|·exp(−TE/T2)
            s = (
                pd
                * torch.abs(1 - 2 * torch.exp(-ti / t1_seq) + torch.exp(-seq.tr / t1_seq))
                * torch.exp(-seq.te / t2)
            )
        rows.append(s * (pd > 0))
    return torch.stack(rows)


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """``[1, 2, 1] / 4`` along each spatial axis of ``(1, C, D, H, W)`` (Gaussian σ ≈ 0.7 voxel)."""
    for axis in (2, 3, 4):
        n = x.shape[axis]
        pad = [0] * 6
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = 1
        xp = F.pad(x, pad, mode="replicate")
        out = xp.narrow(axis, 1, n) * 0.5
        out.add_(xp.narrow(axis, 0, n), alpha=0.25).add_(xp.narrow(axis, 2, n), alpha=0.25)
        x = out
    return x


def _check_lesions(lesions: Any) -> tuple[int, int]:
    if isinstance(lesions, bool):
        raise TypeError(f"lesions must be an int or a (min, max) pair of ints, got {lesions!r}")
    if isinstance(lesions, int):
        lo = hi = lesions
    elif (
        isinstance(lesions, tuple | list)
        and len(lesions) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in lesions)
    ):
        lo, hi = int(lesions[0]), int(lesions[1])
    else:
        raise TypeError(f"lesions must be an int or a (min, max) pair of ints, got {lesions!r}")
    if lo < 0 or hi < lo or hi > 16:
        raise ValueError(f"lesions must satisfy 0 <= min <= max <= 16, got {lesions!r}")
    return lo, hi


class LabeledPhantom(NamedTuple):
    """A phantom with its tissue labels, from ``synthetic_phantom(..., return_labels=True)``.

    Attributes:
        image: ``(C, D, H, W)`` float, each modality in [0, 1].
        labels: ``(D, H, W)`` int64, the values of [`PHANTOM_LABELS`][mrissl.data.PHANTOM_LABELS].
    """

    image: torch.Tensor
    labels: torch.Tensor


def _cpu_generator(generator: Any) -> torch.Generator:
    """``generator`` itself (a CPU ``torch.Generator``), or a fresh one seeded by an int."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator or an int seed, got one on "
                f"{generator.device}"
            )
        return generator
    seed = check_number(generator, "generator", low=0, integer=True)
    return torch.Generator().manual_seed(seed)


@overload
def synthetic_phantom(
    shape: int | Sequence[int] = ...,
    modalities: Sequence[str] = ...,
    *,
    generator: torch.Generator | int | None = ...,
    lesions: int | tuple[int, int] = ...,
    noise: float = ...,
    bias: float = ...,
    partial_volume: bool = ...,
    return_labels: Literal[False] = ...,
    device: torch.device | str | None = ...,
    dtype: torch.dtype = ...,
) -> torch.Tensor: ...
@overload
def synthetic_phantom(
    shape: int | Sequence[int] = ...,
    modalities: Sequence[str] = ...,
    *,
    generator: torch.Generator | int | None = ...,
    lesions: int | tuple[int, int] = ...,
    noise: float = ...,
    bias: float = ...,
    partial_volume: bool = ...,
    return_labels: Literal[True],
    device: torch.device | str | None = ...,
    dtype: torch.dtype = ...,
) -> LabeledPhantom: ...
def synthetic_phantom(
    shape: int | Sequence[int] = (96, 96, 96),
    modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    *,
    generator: torch.Generator | int | None = None,
    lesions: int | tuple[int, int] = (0, 2),
    noise: float = 0.03,
    bias: float = 0.1,
    partial_volume: bool = True,
    return_labels: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | LabeledPhantom:
    """Draw a random multi-contrast 3D head phantom.

    A tissue label map is drawn from implicit shapes on the grid (brain, CSF, skull, fat,
    skin; folded cortex, ventricles, deep grey matter; optional lesions with an enhancing rim,
    necrosis and oedema), with a random size, pose, deformation and atrophy per subject. Each
    tissue's signal follows its modality's pulse sequence
    ([`PHANTOM_TISSUES`][mrissl.data.PHANTOM_TISSUES],
    [`PHANTOM_SEQUENCES`][mrissl.data.PHANTOM_SEQUENCES]):

        spin echo (t1, t1ce, t2, pd):  S = PD·(1 − exp(−TR/T1))·exp(−TE/T2)
        inversion recovery (flair):    S = PD·|1 − 2·exp(−TI/T1) + exp(−TR/T1)|·exp(−TE/T2)
        after gadolinium (t1ce):       1/T1 = 1/T1₀ + r1·[Gd]  in the enhancing rim

    then a ``[1, 2, 1]/4`` partial-volume blur, a smooth bias field ``exp(bias·b(x))``,
    ``|b| ≤ 1``, and Rician noise ``|S + n₁ + i·n₂|``, ``n ~ N(0, (noise·S_max)²)``; each
    modality is finally divided by its maximum. The spatial axes are RAS+ (left→right,
    posterior→anterior, inferior→superior). The anatomy, the tissue values and their sources
    are in the [phantom guide][how-a-head-is-drawn].

    Randomness: everything is drawn from ``generator`` (the global RNG is never used); the
    same seed gives the same tensor on the CPU. On CUDA the noise is drawn on the device, so a
    CUDA phantom shares the anatomy of the CPU one of the same seed, not its noise.

    Args:
        shape: ``(D, H, W)``, or one int for a cube. 96³–160³ are typical; 128³ takes about half a
            second on a CPU.
        modalities: modalities to simulate, in channel order, any known spelling of
            ``t1``, ``t1ce``, ``t2``, ``flair``, ``pd``
            ([`PHANTOM_MODALITIES`][mrissl.data.PHANTOM_MODALITIES]).
        generator: a CPU ``torch.Generator`` to draw from, an int seed, or ``None`` (seed 0).
        lesions: the number of lesions, or a ``(min, max)`` range to draw it from uniformly.
        noise: Rician noise level σ relative to the brightest tissue (0 for none), at most 1.
        bias: strength of the multiplicative bias field (0 for none, 0.1 gives roughly
            0.9–1.1), at most 1.
        partial_volume: whether to smooth tissue boundaries.
        return_labels: also return the label map.
        device: where to build the phantom (default CPU).
        dtype: floating dtype of the image.

    Returns:
        ``image``: ``(C, D, H, W)`` in [0, 1]; with ``return_labels=True`` a
        [`LabeledPhantom`][mrissl.data.LabeledPhantom] ``(image, labels)`` where ``labels`` is
        ``(D, H, W)`` int64 with the values of [`PHANTOM_LABELS`][mrissl.data.PHANTOM_LABELS].

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: for an unknown or unsupported modality, or a value out of range.

    Examples:
        >>> image = synthetic_phantom((32, 32, 32), ("t1", "t2", "flair"), generator=0)
        >>> image.shape, image.dtype, float(image.min()) >= 0.0, float(image.max())
        (torch.Size([3, 32, 32, 32]), torch.float32, True, 1.0)
        >>> torch.equal(image, synthetic_phantom((32, 32, 32), ("t1", "t2", "flair"), generator=0))
        True
        >>> image, labels = synthetic_phantom(32, ["t2"], generator=1, return_labels=True)
        >>> csf, wm = labels == 1, labels == 3
        >>> bool(image[0][csf].mean() > image[0][wm].mean())  # CSF is bright on T2
        True
    """
    size = to_triple(shape, "shape")
    names = canonical_modalities(modalities)
    unsupported = [n for n in names if n not in PHANTOM_SEQUENCES]
    if unsupported:
        raise ValueError(
            f"modalities: the phantom cannot simulate {unsupported}; "
            f"it supports {list(PHANTOM_MODALITIES)}"
        )
    lo, hi = _check_lesions(lesions)
    noise = check_number(noise, "noise", low=0.0, high=1.0)
    bias = check_number(bias, "bias", low=0.0, high=1.0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    g = _cpu_generator(generator)

    # the fields and signal equations need float32 whatever autocast context the caller is in
    with torch.autocast(dev.type, enabled=False):
        return _draw(size, names, g, lo, hi, noise, bias, partial_volume, return_labels, dev, dtype)


def _draw(
    size: tuple[int, int, int],
    names: tuple[str, ...],
    g: torch.Generator,
    lo: int,
    hi: int,
    noise: float,
    bias: float,
    partial_volume: bool,
    return_labels: bool,
    dev: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | LabeledPhantom:
    n_lesions = int(torch.randint(lo, hi + 1, (1,), generator=g)) if hi > lo else lo
    labels = tissue_labels(size, n_lesions, g, dev)
    C = len(names)
    table = _signal_table(names)  # (C, K)
    bias_fields = cosine_fields(size, C, (1.0, 2.0), g, dev)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))

    image = table.to(device=dev, dtype=torch.float32)[:, labels]  # (C, D, H, W)
    if partial_volume:
        image = _binomial_blur(image[None])[0]
    if bias > 0:
        peak = bias_fields.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        image = image * torch.exp(bias * bias_fields / peak)
    if noise > 0:
        sigma = (noise * table.amax(dim=1)).to(device=dev, dtype=torch.float32)
        noise_gen = torch.Generator(dev).manual_seed(noise_seed)
        n = torch.randn((2, *image.shape), generator=noise_gen, device=dev)
        n = n * sigma.view(1, C, 1, 1, 1)
        image = torch.sqrt((image + n[0]) ** 2 + n[1] ** 2)  # Rician: magnitude of complex data
    peak = image.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    image = (image / peak).to(dtype)
    if return_labels:
        return LabeledPhantom(image, labels)
    return image


def _derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index``, decorrelated from its neighbours (NumPy SeedSequence)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


class PhantomDataset(Dataset[Any]):
    """A reproducible collection of [`synthetic_phantom`][mrissl.data.synthetic_phantom] heads.

    Sample ``i`` is the phantom drawn with a seed derived from ``(base, i)`` through NumPy's
    ``SeedSequence``, so it does not depend on the order of access, the number of loader
    workers or the other samples, and two datasets with different bases share no sample. The
    base seed is ``generator`` when it is an int (0 for ``None``), or one number drawn from
    it when it is a ``torch.Generator`` (once, at construction).
    Phantoms are generated on access, never stored.

    Args:
        n: number of samples.
        shape: ``(D, H, W)`` of every sample, or one int.
        modalities: modalities, in channel order (see
            [`synthetic_phantom`][mrissl.data.synthetic_phantom]).
        generator: the collection's randomness: a CPU ``torch.Generator``, an int base seed,
            or ``None`` (base seed 0).
        as_dict: return ``{"image": (C, D, H, W), "label": (D, H, W) int64}`` (the layout of
            MONAI dictionary transforms) instead of the image tensor alone.
        transform: optional callable applied to each sample (tensor or dict) before it is
            returned, for example a MONAI ``Compose``.
        **phantom_kwargs: further keyword arguments of
            [`synthetic_phantom`][mrissl.data.synthetic_phantom] (``lesions``, ``noise``,
            ``bias``, ``partial_volume``, ``dtype``).

    Examples:
        >>> data = PhantomDataset(4, shape=24, modalities=("t1", "flair"), generator=0)
        >>> len(data), data[0].shape
        (4, torch.Size([2, 24, 24, 24]))
        >>> again = PhantomDataset(4, shape=24, modalities=("t1", "flair"), generator=0)
        >>> torch.equal(data[3], again[3])
        True
        >>> batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
        >>> batch.shape  # (B, C, D, H, W)
        torch.Size([2, 2, 24, 24, 24])
        >>> sorted(PhantomDataset(1, shape=24, modalities=("t2",), as_dict=True)[0])
        ['image', 'label']
    """

    def __init__(
        self,
        n: int,
        *,
        shape: int | Sequence[int] = (96, 96, 96),
        modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
        generator: torch.Generator | int | None = None,
        as_dict: bool = False,
        transform: Callable[[Any], Any] | None = None,
        **phantom_kwargs: Any,
    ) -> None:
        n = check_number(n, "n", low=0, integer=True)
        if isinstance(generator, torch.Generator):
            base = int(torch.randint(0, 2**62, (1,), generator=_cpu_generator(generator)))
        else:
            base = (
                0
                if generator is None
                else check_number(generator, "generator", low=0, integer=True)
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        for key in ("return_labels", "generator", "shape", "modalities"):
            if key in phantom_kwargs:
                raise TypeError(f"PhantomDataset sets {key!r} itself; it is not a phantom_kwargs")
        self.n = n
        self.shape = to_triple(shape, "shape")
        self.modalities = canonical_modalities(modalities)
        self.base_seed = base
        self.as_dict = as_dict
        self.transform = transform
        self.phantom_kwargs = dict(phantom_kwargs)
        # fail now on bad arguments rather than in a loader worker
        synthetic_phantom(4, self.modalities, **self.phantom_kwargs)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        given: Any = index  # a NumPy integer is an index too
        k = check_number(
            int(given) if isinstance(given, np.integer) else given, "index", integer=True
        )
        i = k + self.n if k < 0 else k
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} is out of range for a dataset of {self.n} samples")
        image, labels = synthetic_phantom(
            self.shape,
            self.modalities,
            generator=_derive_seed(self.base_seed, i),
            return_labels=True,
            **self.phantom_kwargs,
        )
        item: Any = {"image": image, "label": labels} if self.as_dict else image
        return self.transform(item) if self.transform is not None else item
