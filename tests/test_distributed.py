"""Two gloo processes on CPU against one process holding the whole batch.

The processes are spawned once per test session (module fixture); each runs every scenario on
its shard of a batch that both build from the same seed, compares with the single-process
value computed on the whole batch, and reports the largest differences.

Convention checked (see ``mrissl.distributed``): every process gets the full-batch loss, and the
gradient reaching a process's inputs is ``world_size ×`` the full-batch gradient of those
inputs, so that DDP's averaging gives exactly the full-batch parameter gradient.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrissl.distributed import (
    all_gather,
    all_reduce,
    all_reduce_,
    broadcast_,
    gather_sizes,
    is_distributed,
    rank,
    world_size,
)
from mrissl.losses import barlow_twins, info_nce, pyramid_barlow_twins

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _compare(loss_fn, shapes, sizes, me, seed):
    """Max |difference| of loss and of the rescaled input gradients, shard vs whole batch."""
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64) for shape in shapes]
    ref_inputs = [t.clone().requires_grad_(True) for t in full]
    ref = loss_fn(*ref_inputs, gather=False)
    ref.backward()
    start = sum(sizes[:me])
    mine = [t[start : start + sizes[me]].clone().requires_grad_(True) for t in full]
    got = loss_fn(*mine, gather=True)
    got.backward()
    grad_err = max(
        (m.grad / WORLD - r.grad[start : start + sizes[me]]).abs().max().item()
        for m, r in zip(mine, ref_inputs, strict=True)
    )
    return abs(got.item() - ref.item()) / max(abs(ref.item()), 1e-12), grad_err


SCENARIOS: dict[str, tuple[Any, list[tuple[int, ...]], list[int]]] = {
    "barlow_feature_direct": (
        lambda a, b, gather: barlow_twins(a, b, gather_distributed=gather),
        [(6,), (6,)],
        [4, 4],
    ),
    "barlow_feature_gram_uneven": (
        lambda a, b, gather: barlow_twins(a, b, gather_distributed=gather),
        [(20,), (20,)],
        [3, 2],
    ),
    "barlow_feature_tokens": (
        lambda a, b, gather: barlow_twins(a, b, gather_distributed=gather),
        [(3, 5), (3, 5)],
        [2, 2],
    ),
    "barlow_token_per_sample": (
        lambda a, b, gather: barlow_twins(a, b, mode="token", gather_distributed=gather),
        [(5, 3), (5, 3)],
        [2, 3],
    ),
    "barlow_token_joint": (
        lambda a, b, gather: barlow_twins(
            a, b, mode="token", batch_mode="joint", gather_distributed=gather
        ),
        [(5, 3), (5, 3)],
        [2, 2],
    ),
    "pyramid": (
        lambda a, b, gather: pyramid_barlow_twins([a, a * 2], [b, b], gather_distributed=gather),
        [(4, 3), (4, 3)],
        [2, 2],
    ),
    "info_nce_uneven": (
        lambda a, b, gather: info_nce(a, b, temperature=0.2, gather_distributed=gather),
        [(8,), (8,)],
        [3, 5],
    ),
    "info_nce_one_way": (
        lambda a, b, gather: info_nce(
            a, b, temperature=0.5, symmetric=False, gather_distributed=gather
        ),
        [(8,), (8,)],
        [4, 4],
    ),
}


def _ddp_parameter_gradients(me: int) -> float:
    """A linear encoder wrapped in DDP, trained with gathered Barlow Twins and InfoNCE."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 10).double()
    reference = torch.nn.Linear(6, 10).double()
    reference.load_state_dict(encoder.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(encoder)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)

    def loss_of(model, a, b, gather):
        za, zb = model(a), model(b)
        return barlow_twins(za, zb, gather_distributed=gather) + info_nce(
            za, zb, gather_distributed=gather
        )

    loss_of(reference, x1, x2, False).backward()
    shard = slice(4 * me, 4 * me + 4)
    loss_of(ddp, x1[shard], x2[shard], True).backward()
    return max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(encoder.parameters(), reference.parameters(), strict=True)
    )


def _worker(me: int, port: int, queue: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=me, world_size=WORLD)
        out["basics"] = (is_distributed(), world_size(), rank(), gather_sizes(3 + me))
        # all_gather with uneven sizes: rank r holds r + 1 rows of value r
        x = torch.full((me + 1, 2), float(me), requires_grad=True)
        gathered = all_gather(x)
        out["gathered"] = gathered.tolist()
        (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()
        out["gather_grad"] = x.grad.tolist()
        y = torch.tensor([1.0 + me], requires_grad=True)
        s = all_reduce(y)
        (s * s).sum().backward()
        out["reduce"] = (s.item(), y.grad.item(), all_reduce(y.detach(), "mean").item())
        plain = torch.tensor([1.0 + me, 5.0 - me])
        out["reduce_"] = (
            all_reduce_(plain.clone(), "sum").tolist(),
            all_reduce_(plain.clone(), "max").tolist(),
            all_reduce_(plain.clone(), "mean").tolist(),
            all_reduce_(plain.clone().t()[None].expand(2, -1)[:, :1].contiguous(), "min").tolist(),
            broadcast_(plain.clone()).tolist(),
        )
        for i, (name, (fn, shapes, sizes)) in enumerate(SCENARIOS.items()):
            out[name] = _compare(fn, shapes, sizes, me, seed=10 + i)
        out["ddp"] = _ddp_parameter_gradients(me)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        queue.put((me, out))


@pytest.fixture(scope="module")
def results() -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(WORLD):
            me, res = queue.get(timeout=180)
            out[me] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for me, res in out.items():
        assert "error" not in res, f"rank {me} failed:\n{res['error']}"
    return out


def test_helpers_report_the_process_group(results):
    assert results[0]["basics"] == (True, 2, 0, [3, 4])
    assert results[1]["basics"] == (True, 2, 1, [3, 4])


def test_all_gather_concatenates_uneven_batches_and_sums_gradients(results):
    for me in range(WORLD):
        assert results[me]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    # loss = Σ_k w_k · row_k on both processes, w = 1, 2, 3; each process's grad is summed: 2w
    assert results[0]["gather_grad"] == [[2.0, 2.0]]
    assert results[1]["gather_grad"] == [[4.0, 4.0], [6.0, 6.0]]


def test_all_reduce_sums_values_and_gradients(results):
    for me in range(WORLD):
        total, grad, mean = results[me]["reduce"]
        assert total == 3.0
        assert mean == 1.5
        assert grad == 2 * 2 * 3.0  # d(s²)/ds = 2s on both processes, summed


def test_plain_all_reduce_and_broadcast(results):
    for me in range(WORLD):
        total, biggest, mean, smallest, bcast = results[me]["reduce_"]
        assert total == [3.0, 9.0]
        assert biggest == [2.0, 5.0]
        assert mean == [1.5, 4.5]
        assert smallest == [[1.0], [1.0]]
        assert bcast == [1.0, 5.0]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gathered_loss_and_gradients_match_one_process(results, name):
    for me in range(WORLD):
        loss_err, grad_err = results[me][name]
        assert loss_err < 1e-10, f"rank {me}: relative loss difference {loss_err}"
        assert grad_err < 1e-10, f"rank {me}: gradient difference {grad_err}"


def test_ddp_parameter_gradients_match_one_process(results):
    for me in range(WORLD):
        assert results[me]["ddp"] < 1e-10


def test_without_a_process_group_everything_is_local():
    x = torch.randn(3, 2)
    assert not is_distributed()
    assert world_size() == 1
    assert rank() == 0
    assert all_gather(x) is x
    assert all_reduce(x) is x
    assert gather_sizes(3) == [3]
    assert torch.equal(all_reduce_(x.clone(), "mean"), x)


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match=r"op must be one of \('sum', 'mean'\)"):
        all_reduce(torch.ones(2), "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce_(torch.ones(2), "prod")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="op='mean' needs a floating-point tensor"):
        all_reduce_(torch.ones(2, dtype=torch.long), "mean")
    with pytest.raises(TypeError, match=r"tensor must be a torch\.Tensor"):
        all_gather([1, 2])  # type: ignore[arg-type]
