"""[`ModalityTemplates`][mrissl.templates.ModalityTemplates], the learnable canvases."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mrissl._checks import (
    Triple,
    check_choice,
    check_finite,
    check_number,
    check_tensor,
    to_triple,
)
from mrissl.modalities import canonical_modalities, canonical_modality
from mrissl.templates._fill import (
    _PADDING,
    Padding,
    _check_ids,
    _check_volume_mask,
    crop_templates,
)

__all__ = ["ModalityTemplates"]

Normalize = Literal["none", "sigmoid", "minmax"]
_NORMALIZE = ("none", "sigmoid", "minmax")
_KIND = "mrissl.ModalityTemplates"
_EXTRA_KEY = "_extra_state"


# --------------------------------------------------------------------------------------------
# the module


class ModalityTemplates(nn.Module):
    """One learnable template volume per named modality (BrainMVP modality-wise distillation).

    The templates are one parameter, ``weight: (S, D, H, W)``, a canvas per modality in the
    order of ``modalities``. [`fill`][mrissl.templates.ModalityTemplates.fill] takes each
    crop's window of its modality's canvas (at the crop's ``offsets``) into the masked voxels,
    for the whole batch at once (BrainMVP eq. 3):

        Φ_distill(X, T_m) = X where unmasked, T_m at the same place where masked

    ``normalize`` chooses the values the fill reads, in float32: ``"none"`` the parameter (the
    paper), ``"sigmoid"`` ``σ(weight)``, or ``"minmax"`` ``(T − min T) / max(max T − min T,
    eps)`` per template (the released code, without its division by ~1e-9). Names accept the
    aliases of [`mrissl.modalities`][mrissl.modalities]. Names, settings and the ``affine`` are
    saved in the ``state_dict``, so
    [`from_state_dict`][mrissl.templates.ModalityTemplates.from_state_dict] rebuilds the
    module from a checkpoint alone. The [templates guide][learnable-templates]
    discusses the canvas size, the gradients of each normalization and the optimizer's memory.

    Args:
        modalities: the modality names, in template order.
        shape: ``(D, H, W)`` of every canvas, or one int.
        init: ``"zeros"`` (the paper), a number, or an ``(S, D, H, W)`` tensor.
        normalize: ``"none"``, ``"sigmoid"`` or ``"minmax"``, see above.
        eps: the smallest range ``"minmax"`` divides by.
        padding: what crops leaving the canvas read: ``"error"`` (raise), ``"zeros"``,
            ``"border"``.
        affine: ``(4, 4)`` voxel-to-world matrix of the canvas, written to NIfTI.

    Raises:
        ValueError: for unknown or repeated modality names (the message lists the known ones),
            a bad shape, init, normalization or affine.

    Examples:
        >>> templates = ModalityTemplates(["T1", "t1c", "T2", "t2f"], shape=(32, 40, 32))
        >>> templates.modalities, tuple(templates.weight.shape)
        (('t1', 't1ce', 't2', 'flair'), (4, 32, 40, 32))
        >>> x = torch.rand(2, 1, 16, 16, 16)  # two single-modality crops
        >>> mask = torch.rand(2, 1, 16, 16, 16) < 0.75
        >>> ids = templates.index(["flair", "T1Gd"])  # case 0 is FLAIR, case 1 is T1ce
        >>> out = templates.fill(x, mask, ids, offsets=torch.tensor([[0, 0, 0], [8, 20, 16]]))
        >>> bool((out[mask] == 0).all()), torch.equal(out[~mask], x[~mask])
        (True, True)
    """

    weight: torch.Tensor
    affine: torch.Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        shape: int | Sequence[int] = (160, 192, 160),
        init: Literal["zeros"] | float | torch.Tensor = "zeros",
        normalize: Normalize = "none",
        eps: float = 1e-2,
        padding: Padding = "error",
        affine: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = canonical_modalities(modalities, "modalities")
        canvas = to_triple(shape, "shape")
        check_choice(normalize, "normalize", _NORMALIZE)
        check_choice(padding, "padding", _PADDING)
        eps = check_number(eps, "eps", low=0, low_open=True)
        self.normalize: Normalize = normalize
        self.eps = float(eps)
        self.padding: Padding = padding
        S = len(self.modalities)
        self.weight = nn.Parameter(_initial(init, (S, *canvas)))
        self.register_buffer("affine", _check_affine(affine))

    @property
    def shape(self) -> Triple:
        """``(D, H, W)`` of the canvas."""
        D, H, W = self.weight.shape[1:]
        return int(D), int(H), int(W)

    def index(self, names: str | Iterable[str]) -> torch.Tensor:
        """Template indices of modality names (any known spelling).

        Args:
            names: one name or several (for example the modality of each case).

        Returns:
            ``()`` or ``(len(names),)`` int64 on the templates' device.

        Raises:
            ValueError: for a name that is not a known modality (listing them) or that has no
                template here (listing the templates).

        Examples:
            >>> ModalityTemplates(["t1", "t2", "flair"], shape=8).index(["T2w", "t2f", "T1"])
            tensor([1, 2, 0])
        """
        single = isinstance(names, str)
        wanted = [names] if isinstance(names, str) else list(names)
        out = []
        for name in wanted:
            canonical = canonical_modality(name)
            if canonical not in self.modalities:
                raise ValueError(
                    f"modality {name!r} ({canonical}) has no template; the templates are "
                    f"{list(self.modalities)}"
                )
            out.append(self.modalities.index(canonical))
        ids = torch.tensor(out, dtype=torch.long, device=self.weight.device)
        return ids[0] if single else ids

    def normalized(self) -> torch.Tensor:
        """The normalized canvases the fill reads (``normalize``), with gradient.

        Returns:
            ``(S, D, H, W)`` float32.

        Examples:
            >>> t = ModalityTemplates(["t1"], shape=4, normalize="sigmoid")
            >>> t.normalized().unique().tolist()  # σ(0) at zero init
            [0.5]
        """
        return _normalize(self.weight, self.normalize, self.eps)

    def crop(
        self,
        modality_ids: torch.Tensor | Sequence[str],
        size: int | Sequence[int],
        offsets: torch.Tensor | Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The normalized template windows ``(B, C, d, h, w)`` of each case's channels.

        Args:
            modality_ids: ``(B, C)`` int64 template indices, or ``C`` modality names (the
                same for every case; give ``batch_size`` or ``(B, 3)`` offsets then).
            size: ``(d, h, w)`` of the crop, or one int.
            offsets: ``(B, 3)``/``(3,)`` crop starts in the canvas, ``None`` = centered.
            batch_size: ``B`` when names are given with ``(3,)`` or ``None`` offsets.

        Returns:
            ``(B, C, d, h, w)`` float32.

        Raises:
            TypeError: for a single string as ``modality_ids``.
            ValueError: for unknown names, names without ``batch_size`` or ``(B, 3)`` offsets,
                or a crop outside the canvas (see
                [`crop_templates`][mrissl.templates.crop_templates]).

        Examples:
            >>> t = ModalityTemplates(["t1", "t2"], shape=8, init=1.0)
            >>> t.crop(["t2", "t1"], 4, batch_size=3).shape
            torch.Size([3, 2, 4, 4, 4])
        """
        ids = self._ids(modality_ids, offsets, batch_size)
        return self._crop(ids, offsets, to_triple(size, "size"))

    def _crop(
        self, ids: torch.Tensor, offsets: torch.Tensor | Sequence[int] | None, size: Triple
    ) -> torch.Tensor:
        """Raw windows first, then the normalization: nothing canvas-sized is written."""
        raw = crop_templates(self.weight, ids, offsets, size, padding=self.padding).float()
        if self.normalize == "sigmoid":
            return torch.sigmoid(raw)
        if self.normalize == "minmax":
            lo, scale = _minmax_stats(self.weight, self.eps)
            ids = ids.to(self.device)
            return (raw - lo[ids][..., None, None, None]) / scale[ids][..., None, None, None]
        return raw

    def fill(
        self,
        volume: torch.Tensor,
        voxel_mask: torch.Tensor,
        modality_ids: torch.Tensor | Sequence[str],
        offsets: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Fill the masked voxels from each case's own modality template (BrainMVP eq. 3).

        ``Φ_distill(X_im, T_m)``: see [`template_fill`][mrissl.templates.template_fill]; the
        templates are normalized first (``normalize``). Vectorized over the batch; gradients
        reach the template voxels used by masked voxels (and, for ``"minmax"``, the min and
        max voxels).

        Args:
            volume: ``(B, C, d, h, w)`` floating crops (``C = 1`` for BrainMVP's
                single-modality inputs).
            voxel_mask: ``(B, C or 1, d, h, w)`` bool, True = masked.
            modality_ids: ``(B, C)`` int64 template indices (``(B,)`` when ``C = 1``; see
                [`index`][mrissl.templates.ModalityTemplates.index]), or ``C`` modality names
                shared by every case.
            offsets: ``(B, 3)``/``(3,)`` start of each crop in the canvas along
                ``(D, H, W)``; ``None`` centers the crop.

        Returns:
            ``(B, C, d, h, w)`` in the volume's dtype.

        Raises:
            ValueError: for a crop that does not fit the canvas, bad names, mismatched shapes;
                offsets outside the canvas (``padding="error"``) or bad ids with the value
                checks on (a ``RuntimeError`` without them, see
                [`crop_templates`][mrissl.templates.crop_templates]).

        Examples:
            >>> t = ModalityTemplates(["t1", "t2"], shape=(8, 8, 8), init=2.0)
            >>> x, mask = torch.zeros(1, 2, 4, 4, 4), torch.ones(1, 2, 4, 4, 4, dtype=torch.bool)
            >>> t.fill(x, mask, ["T2", "T1"]).unique().tolist()
            [2.0]
            >>> t.fill(torch.zeros(1, 1, 10, 4, 4), mask[:, :1, :1].expand(1, 1, 10, 4, 4), ["t1"])
            Traceback (most recent call last):
                ...
            ValueError: the crop (10, 4, 4) is larger than the template canvas (8, 8, 8): ...
        """
        B, C, d, h, w = _check_volume_mask(volume, voxel_mask)
        if isinstance(modality_ids, torch.Tensor):
            ids = _check_ids(modality_ids, B, C, len(self.modalities), self.device)
        else:
            ids = self._ids(modality_ids, offsets, B)
            if ids.shape[1] != C:
                raise ValueError(
                    f"modality_ids names {ids.shape[1]} modalities but the volume has "
                    f"C = {C} channels (shape {tuple(volume.shape)})"
                )
        crops = self._crop(ids, offsets, (d, h, w)).to(device=volume.device, dtype=volume.dtype)
        return torch.where(voxel_mask.to(volume.device), crops, volume)

    @property
    def device(self) -> torch.device:
        """The device of the templates."""
        return self.weight.device

    def _ids(
        self,
        modality_ids: torch.Tensor | Sequence[str],
        offsets: torch.Tensor | Sequence[int] | None,
        batch_size: int | None,
    ) -> torch.Tensor:
        if isinstance(modality_ids, torch.Tensor):
            check_tensor(modality_ids, "modality_ids", ndim=2)
            return modality_ids
        if isinstance(modality_ids, str):
            raise TypeError(
                f"modality_ids must be a (B, C) tensor or a sequence of names, got the string "
                f"{modality_ids!r}; write [{modality_ids!r}]"
            )
        if batch_size is None:
            if isinstance(offsets, torch.Tensor) and offsets.ndim == 2:
                batch_size = offsets.shape[0]
            else:
                raise ValueError("batch_size is needed with modality names and no (B, 3) offsets")
        return self.index(modality_ids)[None].expand(batch_size, -1)

    def parameter_groups(
        self, lr: float, *, model: nn.Module | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups that give the templates their own learning rate.

        M3AE trains its learnable fill image at 0.005 against 3e-4 for the network. Without
        ``model`` the result is one group (the templates); with ``model`` (which may contain
        this module) it is ``[rest of model, templates]`` so no parameter appears twice.
        Template groups get ``weight_decay=0`` unless ``options`` says otherwise.

        Args:
            lr: the templates' learning rate.
            model: optional network whose other parameters form the first group.
            **options: further options of the template group (``betas``, ...).

        Returns:
            A list of parameter-group dicts for any ``torch.optim`` optimizer.

        Raises:
            TypeError: for a non-number ``lr``.
            ValueError: for ``lr <= 0`` or not finite.

        Examples:
            >>> net = nn.Conv3d(1, 1, 3)
            >>> t = ModalityTemplates(["t1"], shape=8)
            >>> opt = torch.optim.Adam(t.parameter_groups(5e-3, model=net), lr=3e-4)
            >>> [g["lr"] for g in opt.param_groups]
            [0.0003, 0.005]
        """
        lr = check_number(lr, "lr", low=0, low_open=True)
        own = {id(p) for p in self.parameters()}
        group: dict[str, Any] = {"params": list(self.parameters()), "lr": float(lr)}
        group.setdefault("weight_decay", 0.0)
        group.update(options)
        if model is None:
            return [group]
        rest = [p for p in model.parameters() if id(p) not in own]
        return [{"params": rest}, group]

    # ---- state --------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Modality names and settings, saved in the ``state_dict`` under ``_extra_state``."""
        return {
            "kind": _KIND,
            "version": 1,
            "modalities": list(self.modalities),
            "normalize": self.normalize,
            "eps": self.eps,
            "padding": self.padding,
        }

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded ``state_dict`` holds the same modalities, and take its settings."""
        if not isinstance(state, Mapping) or state.get("kind") != _KIND:
            raise ValueError(f"not the extra state of a ModalityTemplates: {state!r}")
        names = tuple(state["modalities"])
        if names != self.modalities:
            raise ValueError(
                f"the state_dict holds templates for {list(names)}, this module for "
                f"{list(self.modalities)}; rebuild it with ModalityTemplates.from_state_dict"
            )
        self.normalize = _stored_normalize(state)
        self.eps = float(state["eps"])
        self.padding = state["padding"]

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], prefix: str | None = None
    ) -> ModalityTemplates:
        """Rebuild the templates from a ``state_dict`` or a whole checkpoint.

        Works on what ``torch.load(path, weights_only=True)`` returns: the module's own
        ``state_dict``, a model's ``state_dict`` holding it under some prefix, or a checkpoint
        dict nesting one (``{"model": ..., "optimizer": ...}``). With ``prefix=None`` the
        templates are found by their ``_extra_state`` marker; there must be exactly one.

        Args:
            state_dict: the (possibly nested) mapping of tensors.
            prefix: the module's key prefix, for example ``"templates."``; ``""`` for the
                module's own state_dict; ``None`` to search.

        Returns:
            A [`ModalityTemplates`][mrissl.templates.ModalityTemplates] on the CPU with the
            saved names, canvases, affine and settings.

        Raises:
            ValueError: if no templates (or several, with ``prefix=None``) are found.

        Examples:
            >>> model = nn.ModuleDict({"net": nn.Linear(2, 2),
            ...                        "templates": ModalityTemplates(["t1", "t2f"], shape=4)})
            >>> t = ModalityTemplates.from_state_dict({"model": model.state_dict()})
            >>> t.modalities, t.shape
            (('t1', 'flair'), (4, 4, 4))
        """
        flat = _flatten(state_dict)
        if prefix is None:
            found = [
                k[: -len(_EXTRA_KEY)]
                for k, v in flat.items()
                if k.endswith(_EXTRA_KEY) and isinstance(v, Mapping) and v.get("kind") == _KIND
            ]
            if len(found) != 1:
                what = "no ModalityTemplates" if not found else f"several ({found})"
                raise ValueError(
                    f"state_dict holds {what} (looked for '<prefix>{_EXTRA_KEY}' entries "
                    f"marked {_KIND!r}); pass prefix=... to choose"
                )
            prefix = found[0]
        keys = (f"{prefix}weight", f"{prefix}affine", f"{prefix}{_EXTRA_KEY}")
        missing = [k for k in keys if k not in flat]
        if missing:
            raise ValueError(f"state_dict has no {missing} for prefix {prefix!r}")
        weight, affine, extra = (flat[k] for k in keys)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            raise ValueError(f"{keys[0]} must be an (S, D, H, W) tensor, got {weight!r:.80}")
        out = cls(
            extra["modalities"],
            shape=tuple(int(s) for s in weight.shape[1:]),
            init=weight.detach().cpu().float(),
            normalize=_stored_normalize(extra),
            eps=extra["eps"],
            padding=extra["padding"],
            affine=affine.detach().cpu(),
        )
        return out

    # ---- NIfTI --------------------------------------------------------------------------

    def to_nifti(
        self, folder: str | Path, affine: torch.Tensor | None = None, *, normalized: bool = True
    ) -> list[Path]:
        """Write one NIfTI file per modality, ``<folder>/<modality>.nii.gz`` (float32).

        Each file's header ``descrip`` records the modality, its place in the template order
        and the normalization, so [`from_nifti`][mrissl.templates.ModalityTemplates.from_nifti]
        gets names and order back. The voxel axes are the canvas axes ``(D, H, W)``.

        Args:
            folder: where to write (created if needed).
            affine: ``(4, 4)`` voxel-to-world matrix; defaults to the module's ``affine``.
            normalized: write the values the fill uses (``normalized()``) rather than the
                raw parameter; the same when ``normalize="none"``.

        Returns:
            The paths written, in template order.

        Raises:
            ValueError: for an ``affine`` that is not a finite ``(4, 4)`` matrix.

        Examples:
            >>> import tempfile
            >>> t = ModalityTemplates(["t1", "t2f"], shape=(4, 5, 6), init=0.5)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     paths = t.to_nifti(folder, affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
            ...     back = ModalityTemplates.from_nifti(folder)
            >>> [p.name for p in paths], back.modalities, torch.equal(back.weight, t.weight)
            (['t1.nii.gz', 'flair.nii.gz'], ('t1', 'flair'), True)
            >>> back.affine.diagonal().tolist()
            [2.0, 2.0, 2.0, 1.0]
        """
        from mrissl._io import write_template_files

        mat = self.affine if affine is None else _check_affine(affine)
        with torch.no_grad():
            data = self.normalized() if normalized else self.weight.float()
        volumes = data.detach().cpu().numpy()
        norm = self.normalize if not normalized else "none"
        return write_template_files(
            folder, self.modalities, volumes, mat.cpu().numpy(), normalize=norm
        )

    @classmethod
    def from_nifti(
        cls, folder: str | Path, modalities: Sequence[str] | None = None, **kwargs: Any
    ) -> ModalityTemplates:
        """Read templates written by [`to_nifti`][mrissl.templates.ModalityTemplates.to_nifti].

        Args:
            folder: the folder of ``.nii``/``.nii.gz`` files.
            modalities: which modalities to read, in this order (files named
                ``<name>.nii.gz`` in any known spelling); ``None`` reads every file and
                orders them by the index in their header (else by name).
            **kwargs: further arguments of the constructor (``padding``, ...); the
                normalization recorded in the files is used unless given.

        Returns:
            The templates, their affine taken from the files.

        Raises:
            ValueError: if the folder holds no template, a requested modality has no file,
                the files disagree in shape or affine, or a file cannot be read, is not a
                3-D real-valued volume or holds NaN or infinite voxels (one line naming it).
        """
        from mrissl._io import check_one_grid, open_template_files, read_voxels

        files = open_template_files(folder)
        by_name = {canonical_modality(f.name): f for f in files}
        if modalities is None:  # the order recorded in the headers, then by name
            names = sorted(by_name, key=lambda n: (by_name[n].order or 10**6, n))
        else:
            names = list(canonical_modalities(modalities))
            absent = [n for n in names if n not in by_name]
            if absent:
                raise ValueError(
                    f"folder {str(folder)!r} has no file for {absent}; it holds {sorted(by_name)}"
                )
        chosen = [(name, by_name[name].path, by_name[name].image) for name in names]
        affine = check_one_grid(chosen, affine_atol=1e-3, what="the template files")
        init = torch.stack(
            [torch.from_numpy(read_voxels(img, where=str(path))) for _, path, img in chosen]
        )
        kwargs.setdefault("normalize", by_name[names[0]].normalize)
        return cls(
            names,
            shape=tuple(init.shape[1:]),
            init=init,
            affine=torch.from_numpy(affine),
            **kwargs,
        )

    def extra_repr(self) -> str:
        """Names, canvas and settings, for ``print(module)``."""
        return (
            f"modalities={list(self.modalities)}, shape={self.shape}, "
            f"normalize={self.normalize!r}, padding={self.padding!r}"
        )


def _stored_normalize(state: Mapping[str, Any]) -> Any:
    """The normalization of a saved state (``"normalise"`` in states saved by earlier versions)."""
    return state["normalize"] if "normalize" in state else state["normalise"]


def _normalize(weight: torch.Tensor, how: str, eps: float) -> torch.Tensor:
    w = weight.float()
    if how == "sigmoid":
        return torch.sigmoid(w)
    if how == "minmax":
        lo, scale = _minmax_stats(weight, eps)
        return (w - lo.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)
    return w


def _minmax_stats(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S,)`` minimum and ``max(range, eps)`` of each template, float32, with gradient."""
    flat = weight.float().flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return lo, (hi - lo).clamp(min=eps)


def _initial(init: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(init, str):
        if init != "zeros":
            raise ValueError(f"init must be 'zeros', a number or a tensor, got {init!r}")
        return torch.zeros(shape)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(
                f"init tensor must have the template shape (S, D, H, W) = {shape}, got "
                f"{tuple(init.shape)}"
            )
        if not init.is_floating_point():
            raise TypeError(f"init tensor must be floating point, got dtype {init.dtype}")
        return check_finite(init.detach().clone().float(), "init tensor", always=True)
    try:
        value = check_number(init, "init")  # a ValueError for NaN or an infinity
    except TypeError:
        raise TypeError(
            f"init must be 'zeros', a finite number or a tensor, got {type(init).__name__} {init!r}"
        ) from None
    return torch.full(shape, value)


def _check_affine(affine: Any) -> torch.Tensor:
    if affine is None:
        return torch.eye(4, dtype=torch.float64)
    if not isinstance(affine, torch.Tensor):
        affine = torch.as_tensor(affine)
    if tuple(affine.shape) != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {tuple(affine.shape)}")
    a: torch.Tensor = affine.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("affine must be finite")
    return a.clone()


def _flatten(state: Mapping[Any, Any]) -> dict[str, Any]:
    """Nested checkpoint dicts -> one level; a key of a nested dict is not prefixed by it."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, Mapping) and not key.endswith(_EXTRA_KEY):
            for k, v in _flatten(value).items():
                out.setdefault(k, v)
        else:
            out[key] = value
    return out
