"""MkDocs hook: draw the phantom pictures of docs/phantom.md at build time.

Registered in mkdocs.yml under ``hooks:``. On every build it simulates one phantom with
[`mrissl.data.synthetic_phantom`][mrissl.data.synthetic_phantom] (seed 0, 128³, one lesion) and
adds ``img/phantom.png`` to the site as a generated file: the source tree is never written,
so ``mkdocs serve`` does not rebuild in a loop and no binary file is kept in git. The PNG is
encoded with ``zlib`` alone, so the docs build needs no imaging library.

Run it directly to write the picture to a file for a look:
``python docs/_hooks/phantom_images.py /tmp/phantom.png``.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import Any

import numpy as np

__all__ = ["on_files", "phantom_png"]

MODALITIES = ("t1", "t1ce", "t2", "flair", "pd")
SIZE = 128
SEED = 0

# Label colours for the last column (background, CSF, GM, WM, fat, skin, bone, oedema,
# enhancing tumour, necrosis).
_PALETTE = np.array(
    [
        [0, 0, 0],
        [70, 130, 230],
        [120, 190, 90],
        [235, 235, 225],
        [250, 210, 80],
        [200, 150, 120],
        [120, 120, 120],
        [250, 150, 40],
        [230, 40, 60],
        [150, 60, 170],
    ],
    dtype=np.uint8,
)


def _png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as a PNG file."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _display(plane: np.ndarray) -> np.ndarray:
    """A slice ``(first, second)`` with the first axis across and the second pointing up.

    For the RAS axes that is the neurological convention: the patient's right on the right.
    """
    return plane.T[::-1]


def phantom_png() -> bytes:
    """Two rows (axial, coronal) of one slice per modality, then the label map."""
    from mrissl.data import synthetic_phantom

    image, labels = synthetic_phantom(
        SIZE, MODALITIES, generator=SEED, lesions=1, return_labels=True
    )
    img, lab = image.numpy(), labels.numpy()
    # the axial and coronal slices through the lesion's centre (RAS axes: x, y, z)
    lesion = np.argwhere(lab >= 7)
    centre = lesion.mean(axis=0).round().astype(int) if len(lesion) else np.array([64] * 3)
    planes = [
        (lambda v: v[:, :, centre[2]]),  # axial: x across, y (anterior) up
        (lambda v: v[:, centre[1], :]),  # coronal: x across, z (superior) up
    ]
    gap = 4
    rows = []
    for take in planes:
        tiles = []
        for c in range(len(MODALITIES)):
            grey = np.clip(_display(take(img[c])) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            tiles.append(np.repeat(grey[..., None], 3, axis=2))
        tiles.append(_PALETTE[_display(take(lab))])
        spacer = np.full((SIZE, gap, 3), 255, np.uint8)
        row = [t for tile in tiles for t in (tile, spacer)][:-1]
        rows.append(np.concatenate(row, axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    mosaic = np.concatenate([rows[0], spacer, rows[1]], axis=0)
    return _png(np.ascontiguousarray(mosaic))


def on_files(files: Any, config: Any) -> Any:
    """Add the generated ``img/phantom.png`` to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, "img/phantom.png", content=phantom_png()))
    return files


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "phantom.png"
    with open(out, "wb") as handle:
        handle.write(phantom_png())
