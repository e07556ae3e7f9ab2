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
Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Case:
    build: Callable[[torch.device], Fn]  # the callable, with any module on the given device
    inputs: Inputs  # every tensor it takes (features, masks, indices), made on the CPU
    grad: bool = True  # a differentiable loss: compare the gradients of the float inputs too


def _fn(fn: Fn) -> Callable[[torch.device], Fn]:
    return lambda device: fn


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


def _levels_keep_weights(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    # a token-dropping encoder kept 3 of the 6 positions of each sample
    keep = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(2)])
    return *_levels(g), keep, torch.tensor([1.0, 0.5])


def _pbt_keep(z1, z2, m1, m2, keep, weights):
    total = pyramid_barlow_twins([z1, z2], [m1[:, :3], m2[:, :3]], keep=keep, weights=weights)
    return total


def _pair_and_temperature(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return *_pair(8, 16)(g), torch.tensor(0.2)


def _volumes(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.rand(2, 2, 8, 8, 8, generator=g)
    available = torch.tensor([[True, True], [True, False]])
    return torch.rand(2, 2, 8, 8, 8, generator=g), x, available


def _tokens_and_target(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.rand(2, 2, 8, 8, 8, generator=g)
    mask = torch.rand(2, 8, generator=g) < 0.5
    available = torch.tensor([[True, True], [True, False]])
    return torch.rand(2, 8, 2 * 4**3, generator=g), x, mask, available  # stacked tokens, patch 4


def _bt_module(device: torch.device) -> Fn:
    return BarlowTwinsLoss().to(device)


def _pbt_module(device: torch.device) -> Fn:
    pbt = PyramidBarlowTwinsLoss(2, weights=[1.0, 2.0]).to(device)
    return lambda z1, z2, m1, m2: pbt([z1, z2], [m1, m2])


def _info_nce_learned(device: torch.device) -> Fn:
    return InfoNCELoss(temperature=0.07, learnable_temperature=True).to(device)


# every public loss and diagnostic that runs each training step, in each of its code paths
CASES: dict[str, Case] = {
    "barlow_twins feature C": Case(_fn(lambda a, b: barlow_twins(a, b)), _pair(8, 16)),
    "barlow_twins feature gram": Case(_fn(lambda a, b: barlow_twins(a, b)), _pair(3, 16)),
    "barlow_twins feature tokens": Case(_fn(lambda a, b: barlow_twins(a, b)), _pair(2, 3, 8)),
    "barlow_twins token C": Case(
        _fn(lambda a, b: barlow_twins(a, b, mode="token")), _pair(2, 6, 8)
    ),
    "barlow_twins token gram": Case(
        _fn(lambda a, b: barlow_twins(a, b, mode="token", scale_by_size=True)), _pair(2, 20, 4)
    ),
    "barlow_twins token joint": Case(
        _fn(lambda a, b: barlow_twins(a, b, mode="token", batch_mode="joint")), _pair(2, 6, 8)
    ),
    "BarlowTwinsLoss": Case(_bt_module, _pair(8, 16)),
    "pyramid_barlow_twins": Case(
        _fn(lambda z1, z2, m1, m2: pyramid_barlow_twins([z1, z2], [m1, m2])), _levels
    ),
    "pyramid_barlow_twins keep weights": Case(_fn(_pbt_keep), _levels_keep_weights),
    "PyramidBarlowTwinsLoss": Case(_pbt_module, _levels),
    "info_nce": Case(_fn(lambda a, b: info_nce(a, b)), _pair(8, 16)),
    "info_nce negatives tensor temperature": Case(
        _fn(lambda a, b, tau: info_nce(a[:6], b[:6], negatives=b[6:].detach(), temperature=tau)),
        _pair_and_temperature,
    ),
    "info_nce one-way unnormalized": Case(
        _fn(lambda a, b: info_nce(a, b, normalize=False, symmetric=False)), _pair(8, 16)
    ),
    "InfoNCELoss learnable": Case(_info_nce_learned, _pair(8, 16)),
    "masked_reconstruction_loss all": Case(
        _fn(lambda p, x, av: masked_reconstruction_loss(p, x, on="all")), _volumes
    ),
    "masked_reconstruction_loss voxel mask": Case(
        _fn(lambda p, x, av: masked_reconstruction_loss(p, x, x > 0.5, available=av)), _volumes
    ),
    "masked_reconstruction_loss tokens norm_pix": Case(
        _fn(
            lambda p, x, mask, av: masked_reconstruction_loss(
                p, x, mask, patch_size=4, norm_pix=True, available=av
            )
        ),
        _tokens_and_target,
    ),
    "consistency_loss l2": Case(_fn(lambda a, b: consistency_loss(a, b)), _pair(4, 3, 5)),
    "consistency_loss mse": Case(
        _fn(lambda a, b: consistency_loss(a, b, metric="mse")), _pair(4, 6)
    ),
    "effective_rank": Case(_fn(lambda z: effective_rank(z)), _randn(16, 6), grad=False),
    "rankme": Case(_fn(lambda z: rankme(z)), _randn(2, 8, 6), grad=False),
    "singular_values": Case(_fn(lambda z: singular_values(z)), _randn(16, 6), grad=False),
    "effective_rank of a spectrum": Case(
        _fn(lambda s: effective_rank(s.abs())), _randn(6), grad=False
    ),
    "std_of_l2_normalized": Case(_fn(lambda z: std_of_l2_normalized(z)), _randn(16, 6)),
}
# torch.linalg.svdvals reads a convergence flag on the host when it runs on CUDA (PyTorch's
# documented behaviour); these three decompose features, every other case never synchronises
_DECOMPOSE = ("effective_rank", "rankme", "singular_values")


def _call(case: Case, inputs: tuple[torch.Tensor, ...], fn: Fn):
    leaves = tuple(t.clone().requires_grad_(case.grad and t.is_floating_point()) for t in inputs)
    out = fn(*leaves)
    grads: tuple[torch.Tensor | None, ...] = ()
    if case.grad:
        wrt = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, wrt, allow_unused=True)
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
    explanation = torch._dynamo.explain(case.build(torch.device("cpu")))(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_fullgraph_equals_eager_without_recompiling(name: str) -> None:
    case = CASES[name]
    g = torch.Generator().manual_seed(1)
    fn = case.build(torch.device("cpu"))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    first = case.inputs(g)
    _assert_same(_call(case, first, compiled), _call(case, first, fn))
    # a new step: new random values (and masks, kept indices) of the same shapes reuse the graph
    second = case.inputs(g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _call(case, second, compiled)
    _assert_same(got, _call(case, second, fn))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(_DECOMPOSE)])
def test_forward_and_backward_never_synchronise_on_cuda(name: str) -> None:
    case = CASES[name]
    device = torch.device("cuda")
    fn = case.build(device)
    inputs = tuple(t.to(device) for t in case.inputs(torch.Generator().manual_seed(5)))
    _call(case, inputs, fn)  # warm-up: library handles, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _call(case, inputs, fn)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_meter_and_monitor_updates_never_synchronise_on_cuda() -> None:
    device = torch.device("cuda")
    meter, monitor = EffectiveRankMeter(6).to(device), CollapseMonitor(6, window=100).to(device)
    z, loss = torch.randn(5, 6, device=device), torch.rand((), device=device)
    meter.update(z)
    monitor.update(loss, z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meter.update(z)
        monitor.update(loss, z)
        monitor.step(loss, z)  # not a window's end
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
        total = pyramid_barlow_twins([z], [z_m])
        return (
            total
            + barlow_twins(f, f_m)
            + info_nce(f, f_m)
            + consistency_loss(f, f_m)
            + std_of_l2_normalized(f)
        )

    case = Case(_fn(step), lambda g: (*_pair(2, 6, 8)(g), *_pair(8, 16)(g)))
    g = torch.Generator().manual_seed(4)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    first = case.inputs(g)
    _assert_same(_call(case, first, compiled), _call(case, first, step), rtol=1e-5, atol=1e-6)
    second = case.inputs(g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _call(case, second, compiled)
    _assert_same(got, _call(case, second, step), rtol=1e-5, atol=1e-6)
