"""The data adapter of ``collapsed_loss_floor``: batches from a tensor, a Dataset or a loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mrissl._checks import check_tensor
from mrissl.diagnostics._floor_common import _as_batch
from mrissl.distributed import rank as _rank
from mrissl.distributed import world_size as _world_size

__all__ = ["FloorSource"]


def _extract(item: Any, key: str, what: str) -> tuple[Any, Any, Any]:
    """The image of a batch or item (a tensor, ``item[key]`` or ``item[0]``) and more.

    Also returns the ``available`` and ``index`` entries when a mapping holds them.
    """
    available = index = None
    if isinstance(item, Mapping):
        if key not in item:
            raise ValueError(
                f"{what} is a mapping without the key {key!r} (keys: {sorted(map(str, item))}); "
                "pass key= naming the image entry"
            )
        available, index = item.get("available"), item.get("index")
        item = item[key]
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            f"{what} must be a tensor, a mapping holding one under key {key!r}, or a tuple "
            f"whose first element is one; got {type(item).__name__}"
        )
    return item, available, index


def _as_available(available: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    if available is None:
        return None
    avail = torch.as_tensor(available)
    return avail.unsqueeze(0) if avail.ndim == 1 and len(shape) == 4 else avail


def _collate_list(items: list[Any]) -> list[Any]:
    return items


class FloorSource:
    """Batches ``(volume, available, index)`` from a tensor, a Dataset or a DataLoader.

    Tensors and Datasets are split among the processes of a distributed run (volume ``i`` goes
    to rank ``i mod world_size``) and read with ``num_workers`` loader processes; a loader is
    read as it comes (the caller shards it, e.g. with ``DistributedSampler``).
    """

    def __init__(self, data: Any, batch_size: int, key: str, num_workers: int, shard: bool) -> None:
        self.data, self.batch_size, self.key = data, batch_size, key
        self.num_workers = num_workers
        self.is_loader = False
        self.start, self.step = (_rank(), _world_size()) if shard else (0, 1)
        if isinstance(data, torch.Tensor):
            volumes = _as_batch(data, "data")
            self.data = volumes
            self.indices = list(range(volumes.shape[0]))[self.start :: self.step]
        elif isinstance(data, DataLoader) or (
            isinstance(data, Iterable)
            and not isinstance(data, (Dataset, Sequence))
            and iter(data) is not data
        ):
            self.is_loader = True
            self.indices = []
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.indices = list(range(len(data)))[self.start :: self.step]
        else:
            raise TypeError(
                "data must be a tensor (M, C, D, H, W) or (C, D, H, W), a map-style Dataset of "
                "(C, D, H, W) tensors, or a re-iterable DataLoader of (B, C, D, H, W) batches; "
                f"got {type(data).__name__}"
            )
        self.length: int | None = -(-len(self.indices) // batch_size)
        if self.is_loader:
            self.length = len(data) if isinstance(data, Sized) else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any, Any]]:
        if isinstance(self.data, torch.Tensor):
            for start in range(0, len(self.indices), self.batch_size):
                rows = self.indices[start : start + self.batch_size]
                yield self.data[rows], None, torch.tensor(rows)
        elif self.is_loader:
            count = 0
            for batch in self.data:
                x, available, index = _extract(batch, self.key, "a batch of data")
                x = _as_batch(x, "a batch of data")
                if index is None:  # the position in the loader
                    index = torch.arange(count, count + x.shape[0])
                count += x.shape[0]
                yield x, _as_available(available, tuple(x.shape)), index
        else:
            batches = [
                self.indices[s : s + self.batch_size]
                for s in range(0, len(self.indices), self.batch_size)
            ]
            loader = DataLoader(
                _Indexed(self.data),
                batch_sampler=batches,
                num_workers=self.num_workers,
                collate_fn=_collate_list,
            )
            for items in loader:
                yield from self._group(items)

    def _group(self, items: list[Any]) -> Iterator[tuple[torch.Tensor, Any, Any]]:
        parts = []
        for i, item in items:
            x, available, index = _extract(item, self.key, f"data[{i}]")
            check_tensor(x, f"data[{i}]", ndim=4)
            parts.append((x, available, i if index is None else index))
        if all(p[0].shape == parts[0][0].shape for p in parts) and all(
            (p[1] is None) == (parts[0][1] is None) for p in parts
        ):
            volume = _as_batch(torch.stack([p[0] for p in parts]), "a batch of data")
            available = (
                None if parts[0][1] is None else torch.stack([torch.as_tensor(p[1]) for p in parts])
            )
            yield volume, available, torch.tensor([int(p[2]) for p in parts])
        else:  # crops of different sizes: one volume at a time
            for x, available, index in parts:
                yield (
                    _as_batch(x, "data item"),
                    _as_available(available, tuple(x.shape)),
                    torch.tensor([int(index)]),
                )


class _Indexed(Dataset[tuple[int, Any]]):
    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]
