"""Every public step-path callable of masking, templates and nn compiles as one graph.

For each callable: ``torch._dynamo.explain`` finds no graph break; ``torch.compile(...,
fullgraph=True)`` gives the eager result (same seed, same random draws) and does not recompile
when only the tensors change (new masks, new volumes, new random draws); none of it reads a
tensor on the host. The value checks are off here (``mrissl.checks("none")``, the library's
default): with them on, reading values on the host is their point.

The per-callable compiles use the ``aot_eager`` backend (Dynamo's full-graph capture and
AOTAutograd's functionalised forward and backward, without code generation, so they stay
fast); three fused step pieces also go through Inductor, the default backend, with
``fallback_random=True`` so that Inductor draws the same random numbers as eager.

Randomness with ``generator=`` is not traced by Dynamo in this torch (a ``torch.Generator``
argument is a graph break): the compiled step path is the ``generator=None`` one, which
draws from the global RNG (seeded here with ``torch.manual_seed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
from _sync_guard import forbid_host_sync

import mrissl
from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    ModalMask,
    PatchMask,
    PositionMask,
    RandomTokenMask,
    apply_mask,
    cross_modal_fill,
    keep_indices,
    mask_to_voxels,
    target_mask,
    voxels_to_mask,
)
from mrissl.nn import PatchEmbed3d, gather_tokens, patchify, scatter_tokens, unpatchify
from mrissl.templates import ModalityTemplates, TemplateMix, crop_templates, template_fill

B, C, S, P = 2, 3, 8, 4  # (B, C, 8, 8, 8) volumes, 4³ patches: N = 8 tokens
N = (S // P) ** 3
NAMES = ["t1", "t2", "flair"]


@pytest.fixture(autouse=True)
def _checks_off_fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with mrissl.checks("none"):
        yield
    torch._dynamo.reset()


def _volume(seed: int) -> torch.Tensor:
    return torch.rand(B, C, S, S, S, generator=torch.Generator().manual_seed(seed))


def _token_mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, N, generator=g).argsort(dim=2) < N // 2  # exactly N/2 per row


def _available(seed: int) -> torch.Tensor:
    # case 0 misses one modality (a different one per seed), case 1 has all
    avail = torch.ones(B, C, dtype=torch.bool)
    avail[0, seed % C] = False
    return avail


_OFFSETS = torch.tensor([[0, 2, 4], [4, 4, 1]])  # crops of 8³ in a 12³ canvas
_IDS = torch.tensor([[0, 1, 2], [2, 0, 1]])


def _templates(normalize: str = "none", padding: str = "error") -> ModalityTemplates:
    t = ModalityTemplates(NAMES, shape=12, normalize=normalize, padding=padding)  # type: ignore[arg-type]
    with torch.no_grad():
        t.weight.copy_(torch.randn(t.weight.shape, generator=torch.Generator().manual_seed(9)))
    return t


def _patch_embed(**kwargs: Any) -> PatchEmbed3d:
    torch.manual_seed(0)
    return PatchEmbed3d(S, patch_size=P, in_chans=C, embed_dim=8, **kwargs)


@dataclass
class Case:
    """A callable of tensors and a way to make its inputs (``seed`` picks new values)."""

    fn: Callable[..., Any]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]


def _vol(seed: int) -> tuple[torch.Tensor, ...]:
    return (_volume(seed),)


def _vol_mask(seed: int) -> tuple[torch.Tensor, ...]:
    return _volume(seed), _token_mask(seed + 100)


def _vol_avail(seed: int) -> tuple[torch.Tensor, ...]:
    return _volume(seed), _available(seed)


def _tokens_keep(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C * N, 8, generator=g, requires_grad=True)
    return x, keep_indices(_token_mask(seed + 100), num_kept=C * N // 2).keep


_pe = _patch_embed()
_pe_per_mod = _patch_embed(layout="per_modality", shared_proj=False)
_pe_grid = _patch_embed(output_fmt="NDHWC", norm_layer=torch.nn.LayerNorm)
_tm = {name: _templates(name) for name in ("none", "sigmoid", "minmax")}
_tm_zeros = _templates(padding="zeros")
_mix = TemplateMix(_templates(), modalities=NAMES, block_mask=BlockMask(4, mask_ratio=0.5))
_fill_tensor = torch.linspace(-1, 1, S**3).view(1, 1, S, S, S).requires_grad_()


def _pe_no_grad(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _pe(x)


CASES: dict[str, Case] = {
    # mask generators (generator=None: the global RNG)
    "RandomTokenMask": Case(lambda x: RandomTokenMask(0.5)(x, P), _vol),
    "RandomTokenMask-per-modality": Case(
        lambda x: RandomTokenMask(0.5, shared_across_modalities=False)(x, P), _vol
    ),
    "ModalMask": Case(lambda x, a: ModalMask()(x, P, available=a), _vol_avail),
    "ModalMask-probability": Case(lambda x: ModalMask(probability=0.5)(x, P), _vol),
    "ModalMask-candidates": Case(lambda x: ModalMask(candidates=[0, 2])(x, P), _vol),
    "PositionMask": Case(lambda x: PositionMask(0.5)(x, P), _vol),
    "PatchMask": Case(lambda x, a: PatchMask(0.5)(x, P, available=a), _vol_avail),
    "HybridMaskPattern": Case(lambda x: HybridMaskPattern()(x, P), _vol),
    "HybridMaskPattern-available": Case(
        lambda x, a: HybridMaskPattern()(x, P, available=a), _vol_avail
    ),
    "BlockMask": Case(lambda x, a: BlockMask(4, mask_ratio=0.5)(x, available=a), _vol_avail),
    "BlockMask.sample_cubes": Case(
        lambda x: BlockMask(2, mask_ratio=0.5).sample_cubes(B, C, S), _vol
    ),
    "BlockMask.sample_cubes-counted": Case(
        lambda x: BlockMask(2, mask_ratio=0.5).sample_cubes(B, C, S, until="counted"), _vol
    ),
    # applying masks
    "apply_mask-zero": Case(lambda x, m: apply_mask(x, m, P), _vol_mask),
    "apply_mask-constant": Case(lambda x, m: apply_mask(x, m, P, -1.5), _vol_mask),
    "apply_mask-mean": Case(lambda x, m: apply_mask(x, m, P, "mean"), _vol_mask),
    "apply_mask-noise": Case(lambda x, m: apply_mask(x, m, P, "noise"), _vol_mask),
    "apply_mask-tensor": Case(lambda x, m: apply_mask(x, m, P, _fill_tensor), _vol_mask),
    "apply_mask-voxels": Case(lambda x, m: apply_mask(x, mask_to_voxels(m, P, S)), _vol_mask),
    "cross_modal_fill": Case(lambda x, m: cross_modal_fill(x, m, P), _vol_mask),
    "cross_modal_fill-available": Case(
        lambda x, m: cross_modal_fill(x, m, P, available=_available(1), fallback=-2.0),
        _vol_mask,
    ),
    "cross_modal_fill-voxels": Case(
        lambda x, m: cross_modal_fill(x, mask_to_voxels(m, P, S)), _vol_mask
    ),
    "mask_to_voxels": Case(lambda x, m: mask_to_voxels(m, P, S), _vol_mask),
    "voxels_to_mask": Case(lambda x, m: voxels_to_mask(x > 0.5, P, rule="majority"), _vol_mask),
    "keep_indices": Case(lambda x, m: keep_indices(m, num_kept=C * N // 2), _vol_mask),
    "target_mask": Case(lambda x, m: target_mask(m, _available(2)), _vol_mask),
    # templates
    "ModalityTemplates.fill": Case(
        lambda x, m: _tm["none"].fill(x, mask_to_voxels(m, P, S), _IDS, _OFFSETS), _vol_mask
    ),
    "ModalityTemplates.fill-sigmoid-names": Case(
        lambda x, m: _tm["sigmoid"].fill(x, mask_to_voxels(m, P, S), ["flair", "t1", "t2"]),
        _vol_mask,
    ),
    "ModalityTemplates.fill-minmax": Case(
        lambda x, m: _tm["minmax"].fill(x, mask_to_voxels(m, P, S), _IDS, _OFFSETS), _vol_mask
    ),
    "ModalityTemplates.fill-zeros-padding": Case(
        lambda x, m: _tm_zeros.fill(x, mask_to_voxels(m, P, S), _IDS, _OFFSETS + 3), _vol_mask
    ),
    "crop_templates": Case(lambda x: crop_templates(_tm["none"].weight, _IDS, _OFFSETS, S), _vol),
    "template_fill": Case(
        lambda x, m: template_fill(x, mask_to_voxels(m, P, S), _tm["none"].weight, _IDS, _OFFSETS),
        _vol_mask,
    ),
    "TemplateMix": Case(lambda x: _mix(x, offsets=_OFFSETS), _vol),
    "TemplateMix-available": Case(lambda x, a: _mix(x, available=a), _vol_avail),
    # nn
    "PatchEmbed3d": Case(lambda x: _pe(x), _vol),
    "PatchEmbed3d-per-modality": Case(lambda x: _pe_per_mod(x), _vol),
    "PatchEmbed3d-grid-norm": Case(lambda x: _pe_grid(x), _vol),
    "PatchEmbed3d-no-grad": Case(_pe_no_grad, _vol),
    "patchify-unpatchify": Case(lambda x: unpatchify(patchify(x, P) * 2, P, S), _vol),
    "gather_tokens": Case(gather_tokens, _tokens_keep),
    "scatter_tokens": Case(lambda y, k: scatter_tokens(y[:, : k.shape[1]], k, C * N), _tokens_keep),
}


def _flat(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def _run(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], seed: int) -> list[torch.Tensor]:
    """Outputs, then the gradients of every leaf that requires one (inputs and parameters)."""
    leaves = [t for t in inputs if t.requires_grad]
    leaves += [
        p
        for p in [*_pe.parameters(), *_pe_per_mod.parameters(), *_pe_grid.parameters()]
        + [t.weight for t in (*_tm.values(), _tm_zeros)]
        + [_fill_tensor]
    ]
    for leaf in leaves:
        leaf.grad = None
    torch.manual_seed(seed)
    outs = _flat(fn(*inputs))
    diff = [o for o in outs if o.requires_grad]
    if diff:
        g = torch.Generator().manual_seed(seed)
        weights = [torch.randn(o.shape, generator=g) for o in diff]
        sum(((o * w).sum() for o, w in zip(diff, weights, strict=True)), torch.zeros(())).backward()
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    return [o.detach() for o in outs] + [gr.clone() for gr in grads]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


def _compare_twice(compiled: Callable[..., Any], case: Case) -> None:
    """Compiled equals eager on two sets of inputs; the second run reuses the graph.

    The first call compiles (the compiler itself reads constants on the host); the second,
    with new tensors and new random draws, must neither recompile nor read a tensor value.
    """
    _assert_same(_run(compiled, case.inputs(0), 0), _run(case.fn, case.inputs(0), 0))
    inputs = case.inputs(1)
    want = _run(case.fn, inputs, 1)
    with torch._dynamo.config.patch(error_on_recompile=True), forbid_host_sync():
        got = _run(compiled, inputs, 1)
    _assert_same(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_explain_finds_no_graph_break(name: str) -> None:
    case = CASES[name]
    explanation = torch._dynamo.explain(case.fn)(*case.inputs(0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_equals_eager_without_recompiling(name: str) -> None:
    case = CASES[name]
    _compare_twice(torch.compile(case.fn, fullgraph=True, backend="aot_eager"), case)


# --- Inductor, on three fused pieces of the two steps ---------------------------------------


def _emim_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = HybridMaskPattern()(x, P)
    x_m = apply_mask(x, mask, P)
    return mask, x_m, _pe(x_m)


def _brainmvp_views(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    blocks = BlockMask(P, mask_ratio=0.5)(x, available=a)
    filled, source = cross_modal_fill(x, blocks, P, available=a)
    view_g = _tm["sigmoid"].fill(x, mask_to_voxels(blocks, P, S), _IDS, _OFFSETS)
    return blocks, filled, source, view_g


def _template_mix(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    first, second = _mix(x, available=a, offsets=_OFFSETS)
    return first.volume, second.volume, first.replaced, second.replaced


INDUCTOR = {
    "emim-mask-apply-embed": Case(_emim_input, _vol),
    "brainmvp-blocks-fills": Case(_brainmvp_views, _vol_avail),
    "template-mix": Case(_template_mix, _vol_avail),
}


@pytest.mark.parametrize("name", list(INDUCTOR))
def test_inductor_compile_equals_eager_without_recompiling(name: str) -> None:
    case = INDUCTOR[name]
    with torch._inductor.config.patch(fallback_random=True):
        _compare_twice(torch.compile(case.fn, fullgraph=True), case)


def test_inductor_random_draws_keep_the_exact_counts() -> None:
    # with Inductor's own random numbers (the default) the draws differ from eager, but
    # every mask has the structure of the generator: HMP's exact count per sample
    x = _volume(0)
    compiled = torch.compile(lambda v: HybridMaskPattern()(v, P), fullgraph=True)
    want = round(HybridMaskPattern().expected_mask_ratio(C, N) * C * N)
    masks = [compiled(x) for _ in range(3)]
    for mask in masks:
        assert mask.dtype == torch.bool
        assert mask.shape == (B, C, N)
        assert mask.sum(dim=(1, 2)).tolist() == [want] * B
        assert (mask.all(dim=2).sum(dim=1) >= 1).all()  # a whole modality (step 1)
        # the position step hides N/2 whole positions; the patch step never hides a whole one
        assert mask.all(dim=1).sum(dim=1).tolist() == [N // 2] * B
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # fresh draws each call
