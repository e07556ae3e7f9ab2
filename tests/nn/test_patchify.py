from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.nn import grid_size, patchify, unpatchify


def _reference_patchify(x: np.ndarray, p: tuple[int, int, int], stacked: bool) -> np.ndarray:
    """Cut patches with explicit loops over the grid, depth slowest."""
    B, C, D, H, W = x.shape
    rows = []
    for i in range(D // p[0]):
        for j in range(H // p[1]):
            for k in range(W // p[2]):
                block = x[
                    :,
                    :,
                    i * p[0] : (i + 1) * p[0],
                    j * p[1] : (j + 1) * p[1],
                    k * p[2] : (k + 1) * p[2],
                ]
                rows.append(block.reshape(B, C, -1))
    out = np.stack(rows, axis=2)  # (B, C, N, P)
    if stacked:
        out = out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1)
    return out


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 3),  # C
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # grid
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),  # patch
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(["per_modality", "stacked"]))
def test_patchify_then_unpatchify_is_identity(shape, layout):
    B, C, g, p = shape
    size = tuple(gi * pi for gi, pi in zip(g, p, strict=True))
    x = torch.randn(B, C, *size)
    tokens = patchify(x, p, layout=layout)
    assert torch.equal(unpatchify(tokens, p, size), x)


@settings(max_examples=40, deadline=None)
@given(shapes, st.booleans())
def test_patchify_matches_loop_reference(shape, stacked):
    B, C, g, p = shape
    size = tuple(gi * pi for gi, pi in zip(g, p, strict=True))
    x = torch.randn(B, C, *size)
    layout = "stacked" if stacked else "per_modality"
    expected = _reference_patchify(x.numpy(), p, stacked)
    np.testing.assert_array_equal(patchify(x, p, layout=layout).numpy(), expected)


def test_unpatchify_then_patchify_is_identity(device):
    tokens = torch.randn(2, 3, 4 * 2 * 5, 2 * 3 * 4, device=device)
    vol = unpatchify(tokens, (2, 3, 4), (8, 6, 20))
    assert vol.shape == (2, 3, 8, 6, 20)
    assert torch.equal(patchify(vol, (2, 3, 4)), tokens)


def test_stacked_patchify_times_flat_weight_equals_conv3d():
    x = torch.randn(2, 3, 8, 12, 4, dtype=torch.float64)
    conv = torch.nn.Conv3d(3, 5, (4, 4, 2), stride=(4, 4, 2)).double()
    expected = conv(x).flatten(2).transpose(1, 2)
    got = patchify(x, (4, 4, 2), layout="stacked") @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("size", "axis"), [((15, 16, 16), "depth"), ((16, 17, 16), "height"), ((16, 16, 9), "width")]
)
def test_indivisible_axis_is_named_in_the_error(size, axis):
    with pytest.raises(ValueError, match=axis):
        patchify(torch.zeros(1, 1, *size), 8)


def test_unpatchify_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="tokens"):
        unpatchify(torch.zeros(1, 1, 7, 8), 2, 4)


def test_unpatchify_rejects_wrong_patch_length():
    with pytest.raises(ValueError, match="p0\\*p1\\*p2 = 8"):
        unpatchify(torch.zeros(1, 1, 8, 9), 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        unpatchify(torch.zeros(1, 8, 9), 2, 4)


def test_patchify_rejects_bad_arguments():
    with pytest.raises(ValueError, match="5 dimensions"):
        patchify(torch.zeros(1, 8, 8, 8), 2)
    with pytest.raises(ValueError, match="layout"):
        patchify(torch.zeros(1, 1, 8, 8, 8), 2, layout="channels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        patchify(torch.zeros(1, 1, 8, 8, 8), (2, 0, 2))
    with pytest.raises(ValueError, match="3 ints"):
        patchify(torch.zeros(1, 1, 8, 8, 8), (2, 2))
    with pytest.raises(TypeError, match="patch_size"):
        patchify(torch.zeros(1, 1, 8, 8, 8), 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        patchify(np.zeros((1, 1, 8, 8, 8)), 2)  # type: ignore[arg-type]


def test_grid_size_of_anisotropic_patches():
    assert grid_size((96, 128, 160), (16, 16, 8)) == (6, 8, 20)
