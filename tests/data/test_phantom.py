from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mrissl.data import PHANTOM_LABELS, PhantomDataset, synthetic_phantom

CSF, GM, WM, FAT, BONE, OEDEMA, ENHANCING = 1, 2, 3, 4, 6, 7, 8
ALL = ("t1", "t1ce", "t2", "flair", "pd")
CLEAN = dict(noise=0.0, bias=0.0, partial_volume=False)


def _expected_signal(modality: str) -> dict[int, float]:
    """Signal equations written out from the published values (BrainWeb 1.5 T table)."""
    tissues = {  # label: (PD, T1 ms, T2 ms)
        0: (0.0, 1.0, 1.0),
        1: (1.0, 2569.0, 329.0),
        2: (0.86, 833.0, 83.0),
        3: (0.77, 500.0, 70.0),
        4: (1.0, 350.0, 70.0),
        5: (0.77, 500.0, 70.0),
        6: (0.0, 1.0, 1.0),
        7: (0.90, 1000.0, 150.0),
        8: (0.90, 1000.0, 110.0),
        9: (0.95, 2000.0, 250.0),
    }
    out = {}
    for label, (pd, t1, t2) in tissues.items():
        if modality == "t1ce" and label == 8:
            t1 = 1.0 / (1.0 / t1 + 4.1e-3 * 0.5)
        if modality in ("t1", "t1ce"):
            s = pd * (1 - math.exp(-500 / t1)) * math.exp(-15 / t2)
        elif modality == "t2":
            s = pd * (1 - math.exp(-4000 / t1)) * math.exp(-100 / t2)
        elif modality == "pd":
            s = pd * (1 - math.exp(-3000 / t1)) * math.exp(-15 / t2)
        else:
            ti = 2569.0 * math.log(2 / (1 + math.exp(-9000 / 2569.0)))
            s = pd * abs(1 - 2 * math.exp(-ti / t1) + math.exp(-9000 / t1)) * math.exp(-120 / t2)
        out[label] = s
    return out


def _tissue_medians(image, labels):
    return {k: float(image[labels == k].median()) for k in torch.unique(labels).tolist()}


def test_shape_dtype_range_and_labels():
    image, labels = synthetic_phantom((24, 32, 20), ALL, generator=3, return_labels=True)
    assert image.shape == (5, 24, 32, 20)
    assert image.dtype == torch.float32
    assert labels.shape == (24, 32, 20)
    assert labels.dtype == torch.int64
    assert float(image.min()) >= 0.0
    assert torch.allclose(image.amax(dim=(1, 2, 3)), torch.ones(5))
    assert set(torch.unique(labels).tolist()) <= set(PHANTOM_LABELS)
    for tissue in (CSF, GM, WM, FAT, BONE):
        assert (labels == tissue).any()


def test_same_seed_same_phantom_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = synthetic_phantom(32, ("t1", "flair"), generator=7)
    b = synthetic_phantom(32, ("t1", "flair"), generator=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, synthetic_phantom(32, ("t1", "flair"), generator=8))


def test_generator_seed_equals_int_seed_and_advances():
    g = torch.Generator().manual_seed(11)
    first = synthetic_phantom(24, ("t2",), generator=g)
    assert torch.equal(first, synthetic_phantom(24, ("t2",), generator=11))
    assert not torch.equal(synthetic_phantom(24, ("t2",), generator=g), first)


def test_channels_follow_the_requested_order_and_spellings():
    both = synthetic_phantom(24, ("t2", "t1"), generator=1)
    alias = synthetic_phantom(24, ("T2w", "T1n"), generator=1)
    assert torch.equal(both, alias)


@pytest.mark.parametrize("modality", ALL)
def test_noise_free_values_follow_the_signal_equations(modality):
    image, labels = synthetic_phantom(
        40, (modality,), generator=2, lesions=2, return_labels=True, **CLEAN
    )
    expected = _expected_signal(modality)
    present = torch.unique(labels).tolist()
    peak = max(expected[k] for k in present)
    for k in present:
        values = image[0][labels == k]
        np.testing.assert_allclose(values.numpy(), expected[k] / peak, rtol=1e-5, atol=1e-6)


def test_flair_nulls_csf():
    image, labels = synthetic_phantom(32, ("flair",), generator=0, return_labels=True, **CLEAN)
    assert float(image[0][labels == CSF].abs().max()) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrast_ordering_with_noise_and_bias(seed):
    image, labels = synthetic_phantom(
        48, ALL, generator=seed, partial_volume=False, return_labels=True
    )
    t1, t1ce, t2, flair, _ = (_tissue_medians(image[c], labels) for c in range(5))
    assert t2[CSF] > t2[GM] > t2[WM]  # CSF bright on T2, WM darker than GM
    assert t1[WM] > t1[GM] > t1[CSF]  # WM brighter than GM on T1, CSF dark
    assert flair[CSF] < flair[WM]
    assert flair[CSF] < flair[GM]
    assert t1[FAT] > t1[WM]  # scalp fat bright on T1
    assert t1ce[WM] > t1ce[CSF]


def test_contrast_ordering_survives_partial_volume_at_full_size():
    image, labels = synthetic_phantom(96, ("t1", "t2", "flair"), generator=0, return_labels=True)
    t1, t2, flair = (_tissue_medians(image[c], labels) for c in range(3))
    assert t2[CSF] > t2[GM] > t2[WM]
    assert t1[WM] > t1[GM] > t1[CSF]
    assert flair[CSF] < flair[WM]
    assert flair[CSF] < flair[GM]


def test_lesions_enhance_on_t1ce_and_are_bright_on_flair():
    image, labels = synthetic_phantom(
        48, ALL, generator=4, lesions=3, partial_volume=False, return_labels=True
    )
    t1, t1ce, _, flair, _ = (_tissue_medians(image[c], labels) for c in range(5))
    assert ENHANCING in t1ce
    assert OEDEMA in flair
    assert t1ce[ENHANCING] / t1ce[WM] > 1.2 * t1[ENHANCING] / t1[WM]
    assert flair[OEDEMA] > flair[GM] > flair[WM]


def test_lesion_count_argument():
    for seed in range(3):
        _, labels = synthetic_phantom(32, ("t1",), generator=seed, lesions=0, return_labels=True)
        assert int(labels.max()) <= 6
    counts = set()
    for seed in range(12):
        _, labels = synthetic_phantom(
            32, ("t1",), generator=seed, lesions=(0, 2), return_labels=True
        )
        counts.add(bool((labels >= OEDEMA).any()))
    assert counts == {True, False}


def test_subjects_differ_in_shape():
    masks = [
        synthetic_phantom(32, ("t1",), generator=s, return_labels=True)[1] > 0 for s in range(3)
    ]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[1], masks[2])


def test_background_noise_is_rayleigh():
    # Rician noise with zero signal is Rayleigh: mean / std = sqrt(pi / 2) / sqrt(2 - pi / 2)
    image, labels = synthetic_phantom(
        64, ("t1",), generator=0, bias=0.0, partial_volume=False, return_labels=True
    )
    background = image[0][labels == 0].double()
    ratio = float(background.mean() / background.std())
    assert ratio == pytest.approx(math.sqrt(math.pi / 2) / math.sqrt(2 - math.pi / 2), rel=0.03)


def test_bias_field_is_smooth_and_bounded():
    image, labels = synthetic_phantom(
        32, ("t2",), generator=0, noise=0.0, bias=0.2, partial_volume=False, return_labels=True
    )
    csf = image[0][labels == CSF]
    assert float(csf.max() / csf.min()) <= math.exp(0.4) + 1e-6
    assert float(csf.max() / csf.min()) > 1.05


def test_partial_volume_mixes_boundaries():
    sharp = synthetic_phantom(32, ("t1",), generator=0, noise=0.0, bias=0.0, partial_volume=False)
    smooth = synthetic_phantom(32, ("t1",), generator=0, noise=0.0, bias=0.0)
    assert torch.unique(sharp).numel() <= len(PHANTOM_LABELS)
    assert torch.unique(smooth).numel() > 10 * len(PHANTOM_LABELS)


def test_autocast_does_not_change_the_result():
    plain = synthetic_phantom(24, ("t1", "t2"), generator=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = synthetic_phantom(24, ("t1", "t2"), generator=0)
    assert torch.equal(plain, cast)


def test_runs_on_device(device):
    image, labels = synthetic_phantom(
        32, ("t1", "flair"), generator=0, device=device, return_labels=True
    )
    assert image.device.type == device.type
    assert labels.device.type == device.type
    _, cpu_labels = synthetic_phantom(32, ("t1", "flair"), generator=0, return_labels=True)
    # same anatomy; float rounding may move a few boundary voxels
    assert (labels.cpu() == cpu_labels).float().mean() > 0.99


def test_argument_validation():
    with pytest.raises(ValueError, match=r"cannot simulate.*'dwi'"):
        synthetic_phantom(16, ("t1", "dwi"))
    with pytest.raises(ValueError, match="unknown modality"):
        synthetic_phantom(16, ("t1", "swi"))
    with pytest.raises(ValueError, match="noise must be a finite number >= 0 and <= 1"):
        synthetic_phantom(16, noise=-0.1)
    with pytest.raises(ValueError, match="lesions"):
        synthetic_phantom(16, lesions=(3, 1))
    with pytest.raises(TypeError, match="lesions"):
        synthetic_phantom(16, lesions=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        synthetic_phantom(16, generator="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        synthetic_phantom(16, dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        synthetic_phantom((16, 0, 16))


def test_dataset_samples_are_independent_of_access_order():
    data = PhantomDataset(5, shape=16, modalities=("t1", "t2"), generator=3)
    forward = [data[i] for i in range(5)]
    backward = [data[i] for i in reversed(range(5))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(data[-1], forward[4])
    assert not torch.equal(forward[0], forward[1])
    other = PhantomDataset(5, shape=16, modalities=("t1", "t2"), generator=4)
    assert not torch.equal(other[0], forward[0])


def test_dataset_generator_gives_the_base_seed_once():
    plain = PhantomDataset(2, shape=16, modalities=("t1",), generator=5)
    assert torch.equal(plain[1], PhantomDataset(2, shape=16, modalities=("t1",), generator=5)[1])
    assert torch.equal(PhantomDataset(1, shape=16)[0], PhantomDataset(1, shape=16, generator=0)[0])
    g = torch.Generator().manual_seed(9)
    base = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9)))
    drawn = PhantomDataset(2, shape=16, modalities=("t1",), generator=g)
    assert drawn.base_seed == base
    again = PhantomDataset(2, shape=16, modalities=("t1",), generator=base)
    assert torch.equal(drawn[0], again[0])
    assert torch.equal(drawn[1], again[1])
    with pytest.raises(TypeError, match="generator"):
        PhantomDataset(2, shape=16, generator=1.5)  # type: ignore[arg-type]
    # a negative base seed fails at construction, not later in a loader worker
    with pytest.raises(ValueError, match="generator must be an int >= 0, got -1"):
        PhantomDataset(2, shape=16, generator=-1)


def test_labels_come_as_a_named_pair():
    out = synthetic_phantom(16, ("t1",), generator=0, return_labels=True)
    assert out.image.shape == (1, 16, 16, 16)
    assert out.labels.shape == (16, 16, 16)
    assert torch.equal(out.image, synthetic_phantom(16, ("t1",), generator=0))


def test_dataset_dict_output_transform_and_loader():
    data = PhantomDataset(
        4,
        shape=16,
        modalities=("flair",),
        generator=0,
        as_dict=True,
        transform=lambda d: {**d, "n": 1},
        lesions=0,
    )
    item = data[2]
    assert item["image"].shape == (1, 16, 16, 16)
    assert item["label"].shape == (16, 16, 16)
    assert item["n"] == 1
    assert int(item["label"].max()) <= 6
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16, 16)


def test_dataset_validation():
    with pytest.raises(IndexError):
        PhantomDataset(2, shape=16)[2]
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        PhantomDataset(-1, shape=16)
    with pytest.raises(TypeError, match="return_labels"):
        PhantomDataset(2, shape=16, return_labels=True)
    with pytest.raises(ValueError, match="noise"):
        PhantomDataset(2, shape=16, noise=2.0)
