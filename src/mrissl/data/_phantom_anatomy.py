"""The synthetic head phantom's anatomy: smooth random fields and the tissue label map (private).

[`synthetic_phantom`][mrissl.data.synthetic_phantom] draws a head's labels here, then turns
them into images with the MR signal equations. Every shape is an implicit function of the
voxel coordinates, evaluated on the whole grid at once; the phantom guide (``docs/phantom.md``,
*How a head is drawn*) describes the anatomy and its random variation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__: list[str] = []

#: the tissue of each label value, in order (``PHANTOM_LABELS`` of ``mrissl.data.phantom``)
LABEL_NAMES = (
    "background",
    "csf",
    "grey_matter",
    "white_matter",
    "fat",
    "skin",
    "bone",
    "oedema",
    "enhancing_tumour",
    "necrosis",
)
_L = {name: value for value, name in enumerate(LABEL_NAMES)}


def _axis_coords(n: int, device: torch.device) -> torch.Tensor:
    """Voxel centres of one axis in [-1, 1] (0 for a single voxel)."""
    if n == 1:
        return torch.zeros(1, device=device)
    return torch.linspace(-1.0, 1.0, n, device=device)


def cosine_fields(
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


def tissue_labels(
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
    warp = cosine_fields(shape, 3, (1.0, 3.0), g, device)  # smooth shape variation
    fold = cosine_fields(shape, 1, (12.0, 20.0), g, device)[0].abs_()  # cortical folding
    depth = cosine_fields(shape, 1, (1.0, 4.0), g, device)[0]  # sulcal depth variation
    lesion_dir = torch.randn(lesions, 3, generator=g, dtype=torch.float64)
    lesion_r = _uniform(g, 0.15, 0.55, lesions)
    lesion_size = _uniform(g, 0.10, 0.24, lesions)
    lesion_aspect = _uniform(g, 0.75, 1.3, lesions, 3)
    lesion_necrosis = _uniform(g, -0.2, 0.6, lesions).clamp_min(0.0)
    lesion_rim = _uniform(g, 0.15, 0.3, lesions)
    lesion_oedema = _uniform(g, 1.4, 2.4, lesions)
    rough = cosine_fields(shape, 1, (4.0, 8.0), g, device)[0] if lesions else None

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
                lab.masked_fill_(
                    _ellipsoid(ub, (side * c[0], c[1], c[2]), r) < 1.0, _L["grey_matter"]
                )
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
            oedema = tissue & (dist < lesion_oedema[i].item()) & (lab == _L["white_matter"])
            lab.masked_fill_(oedema, _L["oedema"])
            core = tissue & (dist < 1.0)
            lab.masked_fill_(core, _L["enhancing_tumour"])
            lab.masked_fill_(core & (dist < 1.0 - lesion_rim[i].item()), _L["oedema"])
            necrosis = lesion_necrosis[i].item() * (1.0 - lesion_rim[i].item())
            lab.masked_fill_(core & (dist < necrosis), _L["necrosis"])
    return labels
