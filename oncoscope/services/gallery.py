"""Cell gallery thumbnails: every cell of an image cut once, at one physical scale, into one sprite.

One JPEG per analysed image (cells in the order the analysis stored them, ``COLUMNS`` a row) keeps
a 500-cell case to a handful of requests. Cut when the analysis finishes; an image analysed before
galleries existed gets its sprite the first time it is asked for.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ..imaging.imageio import load_image
from ..ml.wbc import THUMB_PX, THUMB_UM, stored_cell_crop

COLUMNS = 16


def sprite_file(analysis) -> str:
    """Per analysis, not per image: the same image analysed in another case (another model, other cells)
    must not show its cells under this case's cell positions."""
    return f"gallery-{analysis.analyzer_id}-a{analysis.id}.jpg"


def ensure_sprite(files, image, analysis) -> bytes:
    """The image's sprite bytes, cut now if the analysis finished before galleries existed."""
    path = files.derived(image.sha256, sprite_file(analysis))
    if path.exists():
        return path.read_bytes()
    data = cut_sprite(load_image(files.path(image.sha256)).rgb, analysis.cells or [], analysis.microns_per_pixel)
    files.put_derived(image.sha256, sprite_file(analysis), data)
    return data


def _scale(cells: list[dict], microns_per_pixel: float | None) -> float | None:
    """The image's scale: measured by the analyzer, else read back from the cells' sizes."""
    if microns_per_pixel:
        return float(microns_per_pixel)
    ratios = [c["diameter_um"] / max(1.0, ((c["bbox"][2] - c["bbox"][0]) + (c["bbox"][3] - c["bbox"][1])) / 2)
              for c in cells if isinstance(c, dict) and c.get("diameter_um") and c.get("bbox")]
    return float(np.median(ratios)) if ratios else None


def cut_sprite(rgb: np.ndarray, cells: list[dict], microns_per_pixel: float | None) -> bytes:
    """JPEG bytes of the cells' thumbnails in a grid; without any scale each cell is framed by its own box."""
    mpp = _scale(cells, microns_per_pixel)
    rows = max(1, math.ceil(len(cells) / COLUMNS))
    sheet = np.full((rows * THUMB_PX, COLUMNS * THUMB_PX, 3), 255, np.uint8)
    for k, c in enumerate(cells):
        if not isinstance(c, dict) or not c.get("bbox"):
            continue  # no box, no picture (its tile stays blank)
        r, col = divmod(k, COLUMNS)
        sheet[r * THUMB_PX:(r + 1) * THUMB_PX, col * THUMB_PX:(col + 1) * THUMB_PX] = stored_cell_crop(
            rgb, c, mpp, THUMB_PX, THUMB_UM)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def position(cell_index: int) -> tuple[int, int]:
    """(x, y) of a cell's thumbnail in its sprite, in sprite pixels."""
    r, col = divmod(cell_index, COLUMNS)
    return col * THUMB_PX, r * THUMB_PX
