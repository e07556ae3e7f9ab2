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


PHANTOM_LABELS: Mapping[int, str] = MappingProxyType(
    {
        0: "background",
        1: "csf",
        2: "grey_matter",
        3: "white_matter",
        4: "fat",
        5: "skin",
        6: "bone",
        7: "oedema",
        8: "enhancing_tumour",
        9: "necrosis",
    }
)
"""Label value → tissue name of the phantom's label map."""
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
"""Tissue name → MR properties (1.5 T). Sources in the docstring of
[`synthetic_phantom`][mrissl.data.synthetic_phantom]."""

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


def _axis_coords(n: int, device: torch.device) -> torch.Tensor:
    """Voxel centres of one axis in [-1, 1] (0 for a single voxel)."""
    if n == 1:
        return torch.zeros(1, device=device)
    return torch.linspace(-1.0, 1.0, n, device=device)


def _cosine_fields(
    shape: tuple[int, int, int],
    n_fields: int,
    band: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Smooth random fields ``(n_fields, D, H, W)`` with unit RMS, band-limited in frequency.

    Each field is a random tensor-product cosine series ``Σ c_ijk cos(πiu) cos(πjv) cos(πkw)``
    over ``u, v, w ∈ [0, 1]``, keeping the terms with ``lo ≤ sqrt(i² + j² + k²) ≤ hi``
    (``hi / 2`` cycles across the grid at most). Evaluated one axis at a time, it costs
    ``O(hi · D·H·W)``: no per-voxel loop and no FFT.
    """
    lo, hi = band
    n = math.floor(hi) + 1
    idx = torch.arange(n, dtype=torch.float32)
    radius = torch.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
    keep = ((radius >= lo) & (radius <= hi)).float()
    coef = torch.randn(n_fields, n, n, n, generator=generator) * keep
    coef = coef.to(device)
    bases = [
        torch.cos(math.pi * idx.to(device)[None, :] * (_axis_coords(s, device)[:, None] + 1) / 2)
        for s in shape
    ]
    D, H, W = shape
    t = coef @ bases[2].T  # (f, i, j, W)
    t = t.transpose(2, 3) @ bases[1].T  # (f, i, W, H)
    t = bases[0] @ t.reshape(n_fields, n, W * H)  # (f, D, W·H)
    fields = t.view(n_fields, D, W, H).transpose(2, 3).contiguous()
    rms = fields.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return fields / rms


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


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


def _uniform(generator: torch.Generator, lo: float, hi: float, *size: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*size, generator=generator, dtype=torch.float64)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``(3, 3)`` from three small angles (radians) about x, y and z."""
    a, b, c = (float(v) for v in angles)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).to(torch.float64)


def _ellipsoid(
    u: Sequence[torch.Tensor], centre: Sequence[float], axes: Sequence[float]
) -> torch.Tensor:
    """``Σ ((u_a − c_a) / r_a)²``: below 1 inside the ellipsoid."""
    out = torch.zeros_like(u[0])
    for ua, ca, ra in zip(u, centre, axes, strict=True):
        out.add_(((ua - ca) / ra).square_())
    return out


Box = tuple[slice, slice, slice]


def _box(u: Sequence[torch.Tensor], centre: Sequence[float], half: Sequence[float]) -> Box | None:
    """Voxel bounding box of ``|u_a − c_a| ≤ half_a`` (None if empty).

    Found on every ``step``-th voxel and widened by ``step``, which is safe because ``u`` is
    smooth; shapes are then drawn inside the box only, the cost of a small structure does not
    grow with the grid.
    """
    shape = u[0].shape
    step = 4 if min(shape) >= 64 else 1
    inside: torch.Tensor | None = None
    for ua, ca, ha in zip(u, centre, half, strict=True):
        test = (ua[::step, ::step, ::step] - ca).abs() <= ha
        inside = test if inside is None else inside & test
    if inside is None or not bool(inside.any()):
        return None
    idx = inside.nonzero()
    lo = (idx.amin(0) * step - step).tolist()
    hi = (idx.amax(0) * step + step + 1).tolist()
    return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, shape, strict=True))  # type: ignore[return-value]


def _tissue_labels(
    shape: tuple[int, int, int],
    lesions: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Draw one head and return its label map ``(D, H, W)`` int64 (see ``PHANTOM_LABELS``)."""
    g = generator
    # --- per-subject random parameters (all drawn on the CPU, in a fixed order) -------------
    scale = _uniform(g, 0.95, 1.05, 3)
    angles = _uniform(g, -1.0, 1.0, 3) * math.radians(4.0)
    shift = _uniform(g, -0.02, 0.02, 3)
    atrophy = float(_uniform(g, 0.0, 1.0, 1))
    warp = _cosine_fields(shape, 3, (1.0, 3.0), g, device)  # smooth shape variation
    fold = _cosine_fields(shape, 1, (12.0, 20.0), g, device)[0].abs_()  # cortical folding
    depth = _cosine_fields(shape, 1, (1.0, 4.0), g, device)[0]  # sulcal depth variation
    lesion_dir = torch.randn(lesions, 3, generator=g, dtype=torch.float64)
    lesion_r = _uniform(g, 0.15, 0.55, lesions)
    lesion_size = _uniform(g, 0.10, 0.24, lesions)
    lesion_aspect = _uniform(g, 0.75, 1.3, lesions, 3)
    lesion_necrosis = _uniform(g, -0.2, 0.6, lesions).clamp_min(0.0)
    lesion_rim = _uniform(g, 0.15, 0.3, lesions)
    lesion_oedema = _uniform(g, 1.4, 2.4, lesions)
    rough = _cosine_fields(shape, 1, (4.0, 8.0), g, device)[0] if lesions else None

    # --- coordinates: x left→right, y posterior→anterior, z inferior→superior (RAS) ----------
    x, y, z = (_axis_coords(s, device) for s in shape)
    p = (x[:, None, None], y[None, :, None], z[None, None, :])
    m = (_rotation(angles) / scale[None, :]).tolist()  # world → head frame
    origin = [shift[b].item() + c for b, c in enumerate((0.0, -0.02, 0.06))]
    q = [
        (p[0] - origin[0]) * m[a][0]
        + (p[1] - origin[1]) * m[a][1]
        + (p[2] - origin[2]) * m[a][2]
        + 0.03 * warp[a]
        for a in range(3)
    ]
    # brain semi-axes (left-right, posterior-anterior, inferior-superior), wider at the back
    ax, ay, az = 0.58, 0.74, 0.64
    u = [q[0] / (ax * (1 - 0.08 * q[1] / ay)), q[1] / ay, q[2] / az]
    # brain frame: the skull's inner surface is near rho_head = 1; a superquadric exponent a
    # little above 2 makes the head slightly boxier than an ellipsoid
    n_sq = 2.15
    rho_head = (u[0].abs() ** n_sq + u[1].abs() ** n_sq + u[2].abs() ** n_sq) ** (1 / n_sq)
    rho = rho_head / (1.0 - 0.05 * atrophy)  # the brain shrinks inside a fixed skull

    labels = torch.zeros(shape, dtype=torch.long, device=device)
    for bound, tissue in ((1.20, "skin"), (1.185, "fat"), (1.12, "bone")):
        labels.masked_fill_(rho_head < bound, _L[tissue])
    labels.masked_fill_((rho_head > 1.065) & (rho_head < 1.09), _L["fat"])  # diploë (marrow)
    labels.masked_fill_(rho_head < 1.035, _L["csf"])
    brain = rho < 1.0
    labels.masked_fill_(brain, _L["grey_matter"])

    # cortex: sulci are thin sheets of CSF where the folding field crosses zero; white matter
    # reaches up into the gyri between them, leaving a grey-matter ribbon around every sulcus.
    sulcal_floor = 0.78 + 0.05 * torch.tanh(depth)
    wm_floor = sulcal_floor - 0.06
    wm_depth = wm_floor + (0.95 - wm_floor) * _smoothstep(fold, 0.9, 1.9)
    labels.masked_fill_(brain & (rho < wm_depth), _L["white_matter"])
    sulci = brain & (rho > sulcal_floor) & (fold < 0.25)

    # medial surface: cortex along the interhemispheric fissure, except where the corpus
    # callosum and the deep structures join the hemispheres
    box = _box(u, (0.0, 0.0, 0.0), (0.12, 2.0, 2.0))
    if box is not None:
        ub = [ua[box] for ua in u]
        lab, midline = labels[box], ub[0].abs()
        callosal = (ub[1] / 0.62).square() + ((ub[2] - 0.02) / 0.48).square() < 1.0
        medial = (midline < 0.11) & ~callosal & (lab == _L["white_matter"])
        lab.masked_fill_(medial, _L["grey_matter"])
        fissure = (midline < 0.03) & ~callosal & brain[box]
        fissure &= (ub[2] > -0.1) | (ub[1].abs() > 0.45)
        sulci[box] |= fissure

    # deep grey matter (thalamus, caudate head, lentiform nucleus) and lateral ventricles
    box = _box(u, (0.0, 0.0, 0.05), (0.45, 0.62, 0.45))
    if box is not None:
        ub, lab = [ua[box] for ua in u], labels[box]
        for side in (-1.0, 1.0):
            for c, r in (
                ((0.12, -0.14, 0.0), (0.10, 0.17, 0.13)),
                ((0.17, 0.26, 0.12), (0.07, 0.12, 0.11)),
                ((0.32, 0.06, 0.0), (0.07, 0.21, 0.13)),
            ):
                lab.masked_fill_(_ellipsoid(ub, (side * c[0], c[1], c[2]), r) < 1.0, 2)
        # bodies beside the midline, horns diverging and dipping at both ends; larger with age
        width, height = 0.085 * (0.8 + 0.7 * atrophy), 0.12 * (0.8 + 0.7 * atrophy)
        y2 = ub[1].square()
        for side in (-1.0, 1.0):
            vent = ((ub[0] - side * (0.08 + 0.4 * y2)) / width).square()
            vent += (ub[1] / 0.52).square() + ((ub[2] - (0.22 - 0.3 * y2)) / height).square()
            lab.masked_fill_((vent < 1.0) & (ub[0].abs() > 0.012), _L["csf"])
    labels.masked_fill_(sulci, _L["csf"])

    # lesions: an enhancing rim around optional necrosis, in oedema that spreads in white matter
    if rough is not None:
        direction = lesion_dir / lesion_dir.norm(dim=1, keepdim=True).clamp_min(1e-12)
        centres = (direction * lesion_r[:, None]).tolist()
        radii = (lesion_size[:, None] * lesion_aspect).tolist()
        for i in range(lesions):
            reach = float(lesion_oedema[i]) + 0.6  # the roughness moves edges by < 0.6 radii
            box = _box(u, centres[i], [r * reach for r in radii[i]])
            if box is None:
                continue
            ub, lab = [ua[box] for ua in u], labels[box]
            dist = _ellipsoid(ub, centres[i], radii[i]).sqrt_() + 0.12 * rough[box]
            tissue = brain[box] & (lab != _L["csf"])
            lab.masked_fill_(tissue & (dist < lesion_oedema[i].item()) & (lab == 3), 7)
            core = tissue & (dist < 1.0)
            lab.masked_fill_(core, _L["enhancing_tumour"])
            lab.masked_fill_(core & (dist < 1.0 - lesion_rim[i].item()), _L["oedema"])
            necrosis = lesion_necrosis[i].item() * (1.0 - lesion_rim[i].item())
            lab.masked_fill_(core & (dist < necrosis), _L["necrosis"])
    return labels


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

    **Anatomy.** Each head is built on a coordinate grid from implicit shapes: a superquadric
    brain (wider at the back) inside CSF, skull with a fatty marrow layer, subcutaneous fat and
    skin; white matter under a grey-matter cortex folded by the zero sheets of a band-limited
    random field (the sulci), an interhemispheric fissure, lateral ventricles, and thalamus,
    caudate and lentiform nuclei. Between subjects, a random scaling (±5 % per axis), rotation
    (±4°), shift and smooth deformation change the shape; a random atrophy widens the CSF spaces
    and ventricles; the folding pattern and sulcal depth are redrawn. Optional lesions of
    random number, place, size and elongation in the brain have an enhancing rim, sometimes a
    necrotic core, and oedema spreading in the surrounding white matter.

    **Contrast.** Each tissue has a proton density PD and relaxation times T1, T2 at 1.5 T
    ([`PHANTOM_TISSUES`][mrissl.data.PHANTOM_TISSUES]). CSF, grey and white matter and fat use
    the values of the BrainWeb simulator (Kwan, Evans & Pike, IEEE TMI 18:1085, 1999;
    Aubert-Broche et al., IEEE TMI 25:1410, 2006): CSF 2569/329 ms, PD 1.0; grey matter
    833/83 ms, PD 0.86; white matter 500/70 ms, PD 0.77; fat 350/70 ms, PD 1.0; skin takes the
    white-matter (connective tissue) values; bone gives no signal. In-vivo T1 of brain is
    longer (Stanisz et al., MRM 54:507, 2005: white matter 884 ms, grey matter 1124 ms at
    1.5 T); the contrast orderings are the same. The lesion values are illustrative, chosen
    within the ranges reported for vasogenic oedema (long T1 and T2), enhancing tumour and
    necrosis (near-fluid). Signals follow ([`PHANTOM_SEQUENCES`][mrissl.data.PHANTOM_SEQUENCES]):

    * ``t1``, ``t2``, ``pd``: spin echo, ``S = PD·(1 − exp(−TR/T1))·exp(−TE/T2)`` with
      TR/TE = 500/15 ms (T1-weighted), 4000/100 ms (T2-weighted), 3000/15 ms (PD-weighted);
    * ``flair``: inversion recovery, ``S = PD·|1 − 2·exp(−TI/T1) + exp(−TR/T1)|·exp(−TE/T2)``
      with TR/TE = 9000/120 ms and the TI that nulls CSF,
      ``TI = T1_csf·ln(2 / (1 + exp(−TR/T1_csf)))`` (1704 ms);
    * ``t1ce``: the T1-weighted sequence after gadolinium, whose relaxivity r1 ≈ 4.1 L/(mmol·s)
      at 1.5 T (Rohrer et al., Invest. Radiol. 40:715, 2005) at 0.5 mmol/L shortens T1 of the
      enhancing rim through ``1/T1 = 1/T1₀ + r1·[Gd]``.

    So CSF is bright on T2 and dark on T1 and FLAIR, white matter is brighter than grey matter
    on T1 and darker on T2, fat is bright on T1, and lesions are bright on T2 and FLAIR.

    **Acquisition.** The tissue signals are smoothed by a ``[1, 2, 1]/4`` filter along each
    axis (partial volume, Gaussian σ ≈ 0.7 voxel), multiplied by a smooth bias field
    ``exp(bias · b(x))`` with ``|b| ≤ 1`` drawn per modality, and corrupted by Rician noise:
    the magnitude ``|S + n₁ + i·n₂|`` with ``n₁, n₂ ~ N(0, σ²)``, ``σ = noise · S_max`` where
    ``S_max`` is the modality's brightest tissue signal. Each modality is then divided by its
    maximum, so it lies in [0, 1].

    **Axes.** ``(D, H, W)`` are the RAS+ axes left→right, posterior→anterior and
    inferior→superior, as after [`preprocessing`][mrissl.data.preprocessing]'s orientation
    step: ``volume[:, :, :, k]`` is an axial slice. The head fills the grid along every axis,
    so a non-cubic ``shape`` gives anisotropic voxels.

    **Randomness.** All subject parameters are drawn from ``generator``, a CPU
    ``torch.Generator`` whose state then advances; an int is a seed for a fresh one, and
    ``None`` is the fixed seed 0, so that the default phantom is always the same head. The
    global RNG is never used. On the CPU the same seed gives the same tensor;
    on CUDA the noise is drawn on the device, so CPU and CUDA phantoms of one seed share their
    anatomy but not their noise.

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
    labels = _tissue_labels(size, n_lesions, g, dev)
    C = len(names)
    table = _signal_table(names)  # (C, K)
    bias_fields = _cosine_fields(size, C, (1.0, 2.0), g, dev)
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
            base = 0 if generator is None else check_number(generator, "generator", integer=True)
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
