"""Our random MONAI transforms draw fresh masks in every loader worker and every epoch.

A plain ``torch.utils.data.DataLoader`` forks its workers with a copy of the parent's random
state; without care every worker replays the same masks and every epoch repeats the last.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader as MonaiDataLoader
from torch.utils.data import DataLoader, Dataset

from mrissl.data import (
    RandBlockMaskd,
    RandHybridMaskd,
    RandMaskd,
    RandTokenMaskd,
    TemplateMixd,
)
from mrissl.masking import BlockMask, RandomTokenMask
from mrissl.templates import ModalityTemplates

CASES = 8


class _Cases(Dataset):
    """The same small image in every case: only the transform's draw differs."""

    def __init__(self, transform, channels):
        self.transform = transform
        self.image = torch.rand(channels, 16, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return CASES

    def __getitem__(self, index):
        return self.transform({"image": self.image.clone()})


def _hybrid():
    return RandHybridMaskd("image", patch_size=4), "mask", 4


def _block():
    return RandBlockMaskd("image", block_size=4, mask_ratio=0.5), "mask", 2


def _token():
    return RandTokenMaskd("image", patch_size=4, mask_ratio=0.5), "mask", 2


def _generic():
    return RandMaskd("image", RandomTokenMask(0.5), patch_size=4), "mask", 2


def _template_mix():
    # one modality: the single-modality variant fills random template blocks in each copy
    templates = ModalityTemplates(["t1"], shape=16, init=-1.0)
    mix = TemplateMixd("image", templates, ["t1"], block_mask=BlockMask(4, mask_ratio=0.5))
    return mix, "image_view1", 1


FACTORIES = [_hybrid, _block, _token, _generic, _template_mix]
IDS = ["RandHybridMaskd", "RandBlockMaskd", "RandTokenMaskd", "RandMaskd", "TemplateMixd"]


def _draws(loader, key, epochs=2):
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.extend(batch[key])  # batch_size=1: one tensor per case
    return out


def _distinct(tensors):
    return len({t.contiguous().numpy().tobytes() for t in tensors})


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_plain_loader_two_workers_two_epochs_all_distinct(factory):
    transform, key, channels = factory()
    transform.set_random_state(0)
    loader = DataLoader(_Cases(transform, channels), batch_size=1, num_workers=2)
    draws = _draws(loader, key)
    assert len(draws) == 2 * CASES
    assert _distinct(draws) == 2 * CASES


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_plain_loader_is_reproducible(factory):
    """The same torch seed and set_random_state give the same draws; another seed does not."""

    def run(torch_seed, state):
        transform, key, channels = factory()
        transform.set_random_state(state)
        loader = DataLoader(
            _Cases(transform, channels),
            batch_size=1,
            num_workers=2,
            generator=torch.Generator().manual_seed(torch_seed),
        )
        return torch.stack(_draws(loader, key, epochs=1))

    first = run(1, 0)
    assert torch.equal(first, run(1, 0))
    assert not torch.equal(first, run(2, 0))  # the loader's seed matters
    assert not torch.equal(first, run(1, 5))  # and so does set_random_state


def test_main_process_follows_set_random_state():
    """Without workers the draws are those of the transform's own state, as before."""
    transform, key, channels = _hybrid()
    transform.set_random_state(7)
    loader = DataLoader(_Cases(transform, channels), batch_size=1, num_workers=0)
    loaded = torch.stack(_draws(loader, key, epochs=1))
    direct, _, _ = _hybrid()
    direct.set_random_state(7)
    image = _Cases(direct, channels).image
    expected = torch.stack([direct({"image": image.clone()})[key] for _ in range(CASES)])
    assert torch.equal(loaded, expected)


def test_monai_loader_keeps_its_worker_seeds():
    """MONAI's loader reseeds each worker; its draws are distinct and follow torch's seed."""

    def run(seed):
        transform, key, channels = _hybrid()
        torch.manual_seed(seed)
        loader = MonaiDataLoader(_Cases(transform, channels), batch_size=1, num_workers=2)
        return _draws(loader, key)

    draws = run(0)
    assert _distinct(draws) == 2 * CASES
    assert torch.equal(torch.stack(draws), torch.stack(run(0)))


def test_worker_init_fn_state_is_kept():
    """A state set inside the worker (as MONAI's worker_init_fn does) is not replaced."""

    def init(worker_id):
        info = torch.utils.data.get_worker_info()
        info.dataset.transform.set_random_state(100)  # the same in both workers, on purpose

    transform, key, channels = _token()
    loader = DataLoader(
        _Cases(transform, channels), batch_size=1, num_workers=2, worker_init_fn=init
    )
    draws = _draws(loader, key, epochs=1)
    direct, _, _ = _token()
    direct.set_random_state(100)
    image = _Cases(direct, channels).image
    expected = [direct({"image": image.clone()})[key] for _ in range(CASES // 2)]
    # each worker replays state 100 for its own cases: workers take cases alternately
    assert all(torch.equal(draws[i], expected[i // 2]) for i in range(CASES))
