"""Every loss and diagnostic of the training step compiles into one graph and equals eager.

Each public step-path callable is traced with ``torch._dynamo.explain`` (zero graph breaks: no
``.item()``, ``bool(tensor)``, ``.tolist()`` or data-dependent branch), compiled with
``fullgraph=True`` (values and gradients equal to eager) and called again with new random values
of the same shapes, which must not recompile. The value checks are off inside these tests (the
library's default): with them on, each check reads a value on the host by design.

Most cases compile with the ``aot_eager`` backend, which runs the same Dynamo capture and
AOTAutograd (forward and backward graphs) as Inductor without its C++ compilation; one test
compiles a whole loss path with Inductor on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import mrissl
from mrissl.diagnostics import (
    CollapseMonitor,
    EffectiveRankMeter,
    effective_rank,
    rankme,
    singular_values,
    std_of_l2_normalized,
)
from mrissl.losses import (
    BarlowTwinsLoss,
    InfoNCELoss,
    PyramidBarlowTwinsLoss,
    barlow_twins,
    consistency_loss,
    info_nce,
    masked_reconstruction_loss,
    pyramid_barlow_twins,
)

Inputs = Callable[[torch.Generator], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Case:
    fn: Callable[..., torch.Tensor]
    inputs: Inputs
    grad: bool = True  # a differentiable loss: compare the gradients of the float inputs too


def _randn(*shape: int) -> Inputs:
    return lambda g: (torch.randn(*shape, generator=g),)


def _pair(*shape: int) -> Inputs:
    def make(g: torch.Generator) -> tuple[torch.Tensor, ...]:
        a = torch.randn(*shape, generator=g)
        return a, a + 0.5 * torch.randn(*shape, generator=g)

    return make


def _levels(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    full = [torch.randn(2, 6, 8, generator=g) for _ in range(2)]
    return *full, *(z + 0.3 * torch.randn(z.shape, generator=g) for z in full)


def _pbt_keep(z1, z2, m1, m2):
    # a token-dropping encoder kept positions 5, 0 and 2 of both samples
    keep = torch.tensor([[5, 0, 2], [1, 3, 4]])
    total, _ = pyramid_barlow_twins(
        [z1, z2], [m1[:, :3], m2[:, :3]], keep=keep, weights=torch.tensor([1.0, 0.5])
    )
    return total


def _volumes(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.rand(2, 2, 8, 8, 8, generator=g)
    return torch.rand(2, 2, 8, 8, 8, generator=g), x


def _tokens_and_target(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.rand(2, 2, 8, 8, 8, generator=g)
    return torch.rand(2, 8, 2 * 4**3, generator=g), x  # stacked tokens, patch 4


_TOKEN_MASK = torch.tensor([[True, False] * 4, [False, True] * 4]).reshape(2, 8)
_AVAILABLE = torch.tensor([[True, True], [True, False]])
_BT_MODULE = BarlowTwinsLoss()
_PBT_MODULE = PyramidBarlowTwinsLoss(2, weights=[1.0, 2.0])
_INFO_NCE_LEARNED = InfoNCELoss(temperature=0.07, learnable_temperature=True)

# every public loss and diagnostic that runs each training step, in each of its code paths
CASES: dict[str, Case] = {
    "barlow_twins feature C": Case(lambda a, b: barlow_twins(a, b), _pair(8, 16)),
    "barlow_twins feature gram": Case(lambda a, b: barlow_twins(a, b), _pair(3, 16)),
    "barlow_twins feature tokens": Case(lambda a, b: barlow_twins(a, b), _pair(2, 3, 8)),
    "barlow_twins token C": Case(lambda a, b: barlow_twins(a, b, mode="token"), _pair(2, 6, 8)),
    "barlow_twins token gram": Case(
        lambda a, b: barlow_twins(a, b, mode="token", scale_by_size=True), _pair(2, 20, 4)
    ),
    "barlow_twins token joint": Case(
        lambda a, b: barlow_twins(a, b, mode="token", batch_mode="joint"), _pair(2, 6, 8)
    ),
    "BarlowTwinsLoss": Case(lambda a, b: _BT_MODULE(a, b), _pair(8, 16)),
    "pyramid_barlow_twins": Case(
        lambda z1, z2, m1, m2: pyramid_barlow_twins([z1, z2], [m1, m2])[0], _levels
    ),
    "pyramid_barlow_twins keep": Case(_pbt_keep, _levels),
    "PyramidBarlowTwinsLoss": Case(lambda z1, z2, m1, m2: _PBT_MODULE([z1, z2], [m1, m2]), _levels),
    "info_nce": Case(lambda a, b: info_nce(a, b), _pair(8, 16)),
    "info_nce negatives": Case(
        lambda a, b: info_nce(
            a[:6], b[:6], negatives=b[6:].detach(), temperature=torch.tensor(0.2)
        ),
        _pair(8, 16),
    ),
    "info_nce one-way unnormalized": Case(
        lambda a, b: info_nce(a, b, normalize=False, symmetric=False), _pair(8, 16)
    ),
    "InfoNCELoss learnable": Case(lambda a, b: _INFO_NCE_LEARNED(a, b), _pair(8, 16)),
    "masked_reconstruction_loss all": Case(
        lambda p, x: masked_reconstruction_loss(p, x, on="all"), _volumes
    ),
    "masked_reconstruction_loss voxel mask": Case(
        lambda p, x: masked_reconstruction_loss(p, x, x > 0.5, available=_AVAILABLE), _volumes
    ),
    "masked_reconstruction_loss tokens norm_pix": Case(
        lambda p, x: masked_reconstruction_loss(
            p, x, _TOKEN_MASK, patch_size=4, norm_pix=True, available=_AVAILABLE
        ),
        _tokens_and_target,
    ),
    "consistency_loss l2": Case(lambda a, b: consistency_loss(a, b), _pair(4, 3, 5)),
    "consistency_loss mse": Case(lambda a, b: consistency_loss(a, b, metric="mse"), _pair(4, 6)),
    "effective_rank": Case(lambda z: effective_rank(z), _randn(16, 6), grad=False),
    "rankme": Case(lambda z: rankme(z), _randn(2, 8, 6), grad=False),
    "singular_values": Case(lambda z: singular_values(z), _randn(16, 6), grad=False),
    "std_of_l2_normalized": Case(lambda z: std_of_l2_normalized(z), _randn(16, 6)),
}


def _call(case: Case, inputs: tuple[torch.Tensor, ...], fn: Callable[..., torch.Tensor]):
    leaves = tuple(t.clone().requires_grad_(case.grad) for t in inputs)
    out = fn(*leaves)
    grads: tuple[torch.Tensor | None, ...] = ()
    if case.grad:
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), grads


def _assert_same(got, want, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    (out, grads), (out_ref, grads_ref) = got, want
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with mrissl.checks("none"):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CASES))
def test_step_path_callable_has_no_graph_break(name: str) -> None:
    case = CASES[name]
    inputs = case.inputs(torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(case.fn)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_fullgraph_equals_eager_without_recompiling(name: str) -> None:
    case = CASES[name]
    g = torch.Generator().manual_seed(1)
    compiled = torch.compile(case.fn, fullgraph=True, backend="aot_eager")
    first = case.inputs(g)
    _assert_same(_call(case, first, compiled), _call(case, first, case.fn))
    # a new step: new random values of the same shapes reuse the graph
    second = case.inputs(g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _call(case, second, compiled)
    _assert_same(got, _call(case, second, case.fn))


def test_meter_update_compiles_and_accumulates_like_eager() -> None:
    g = torch.Generator().manual_seed(2)
    eager, compiled_meter = EffectiveRankMeter(6), EffectiveRankMeter(6)
    assert (
        torch._dynamo.explain(EffectiveRankMeter(6).update)(torch.randn(5, 6)).graph_break_count
        == 0
    )
    update = torch.compile(compiled_meter.update, fullgraph=True, backend="aot_eager")
    batches = [torch.randn(5, 6, generator=g) for _ in range(3)]
    update(batches[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for z in batches[1:]:
            update(z)
    for z in batches:
        eager.update(z)
    for name in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(compiled_meter, name), getattr(eager, name))
    torch.testing.assert_close(compiled_meter.compute().spectrum, eager.compute().spectrum)


def test_collapse_monitor_update_compiles_and_step_closes_the_window() -> None:
    g = torch.Generator().manual_seed(3)
    monitor, eager = CollapseMonitor(6, window=4), CollapseMonitor(6, window=4)
    probe = CollapseMonitor(6, window=4)
    explanation = torch._dynamo.explain(probe.update)(torch.tensor(0.5), torch.randn(5, 6))
    assert explanation.graph_break_count == 0
    update = torch.compile(monitor.update, fullgraph=True, backend="aot_eager")
    steps = [(torch.rand((), generator=g), torch.randn(5, 6, generator=g)) for _ in range(4)]
    update(*steps[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loss, z in steps[1:3]:
            update(loss, z)
    monitor.steps = 3  # update counts no steps; step() below closes the window
    status = monitor.step(*steps[3])
    for loss, z in steps:
        want = eager.step(loss, z)
    assert status == want
    assert status.step == 4
    assert status.loss == pytest.approx(float(sum(loss for loss, _ in steps)) / 4)


def test_value_checks_switched_on_after_compiling_still_catch_nan() -> None:
    compiled = torch.compile(lambda a, b: barlow_twins(a, b), backend="aot_eager")
    a = torch.randn(8, 16)
    compiled(a, a + 1)  # compiled with the checks off
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(compiled(bad, a))  # off: no synchronisation, the NaN comes back
    with mrissl.checks("values"), pytest.raises(ValueError, match="z_a contains NaN or Inf"):
        compiled(bad, a)


def test_loss_path_compiles_with_inductor_and_equals_eager() -> None:
    # one Inductor compilation (C++ on the CPU) of several losses and diagnostics together
    def step(z, z_m, f, f_m):
        total, _ = pyramid_barlow_twins([z], [z_m])
        return (
            total
            + barlow_twins(f, f_m)
            + info_nce(f, f_m)
            + consistency_loss(f, f_m)
            + std_of_l2_normalized(f)
        )

    case = Case(step, lambda g: (*_pair(2, 6, 8)(g), *_pair(8, 16)(g)))
    g = torch.Generator().manual_seed(4)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    first = case.inputs(g)
    _assert_same(_call(case, first, compiled), _call(case, first, step), rtol=1e-5, atol=1e-6)
    second = case.inputs(g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _call(case, second, compiled)
    _assert_same(got, _call(case, second, step), rtol=1e-5, atol=1e-6)
