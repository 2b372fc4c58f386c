"""White-cell detection, physical scale and cell crops on stained blood smears (numpy/scipy only).

Works on any Romanowsky-type stain (Giemsa, May-Grünwald-Giemsa, Wright, rapid stains) and any
camera, without a trained network, so it cannot learn one laboratory's look:

1. Each channel is divided by the image's own background brightness, which removes the lamp's and
   the camera's colour cast.
2. Nuclei of white cells absorb more green than blue light (they look purple); red cells and the
   background much less so. ``purple = blue - green`` (background-relative) is high on nuclei in
   every source measured (see the smear-differential model card), and a threshold above the red
   cells' own level (Otsu within the stained pixels, with a floor) keeps the nuclei.
3. Red cells (stained blobs that are not purple) give the scale: their median diameter is about
   7.5 µm. Without enough red cells the white cell's own size gives a rougher estimate.
4. Nucleus lobes closer than about 2 µm are joined (a segmented neutrophil is one cell), pieces
   smaller than a platelet-sized nucleus are dropped, and each cell's box grows from its nucleus to
   the stained cytoplasm around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

RBC_DIAMETER_UM = 7.5  # a normal red cell on a dried smear
WBC_DIAMETER_UM = 11.0  # a typical white cell, when there are no red cells to measure
MIN_NUCLEUS_UM = 2.6  # equivalent diameter; smaller purple things are platelets or debris
MAX_CELL_UM = 30.0  # larger purple areas are clumps, smudges or not a smear: counted as rejected
MAX_NUCLEUS_UM = 18.0  # a typical nucleus larger than this at the red-cell scale: the scale is wrong
WORK_MAX_SIDE = 720  # detection runs on an image no larger than this (time and memory)
TILE_ABOVE_SIDE = 1080  # a larger image is detected in tiles when shrinking it whole loses the red cells
COARSEST_WORK_UM = 0.55  # µm per working pixel above which it does (a red cell under ~14 px)
TILE_WORK_UM = 0.4  # tiles are detected at this working scale (the crops' scale)
# Nucleus hysteresis on purple + stained (background-relative, so the same for every camera); set on the
# raabin-fields train split and checked on the other sources (smear-differential model card):
SEED_MARGIN = 0.45  # a seed stands this far above the median stained pixel (the red cells, in a field)
SEED_FLOOR = 0.45  # ... and above this in any case (a pale field's red cells are not seeds)
LOW_FLOOR = 0.3  # a nucleus grows from its seed down to the Otsu level, but not below this
STAIN_MIN = 0.06  # background-relative darkness in green that counts as stained at all
MIN_RED_CELLS = 6  # fewer measured red cells: the scale comes from the white cell
RBC_OTSU_FRACTION = 0.6  # of the Otsu level: a red cell's pale centre is stained too
MARGIN_NUCLEI = 0.1  # nucleus diameters around a nucleus that are not searched for red cells
CYTOPLASM_MIN_PURPLE = 0.03  # cytoplasm is at least a little bluer than green (red cells may be too)
LOBE_GAP_UM = 4.0  # neutrophil lobes up to this far apart are one nucleus ...
MAX_LOBED_NUCLEUS_UM = 13.0  # ... when the joined nucleus is no wider than this
MPP_RANGE = (0.03, 1.5)  # µm per pixel a smear image can have (100x oil to a 10x overview)


@dataclass
class Detection:
    """One white cell (or nucleated object) in input-image pixels."""
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centroid: tuple[float, float]  # x, y
    area_px: float  # stained area of the cell (nucleus + cytoplasm)
    nucleus_area_px: float
    circularity: float
    touches_border: bool


@dataclass
class Scale:
    microns_per_pixel: float
    method: str  # "red_cells" | "white_cell_size" | "default"
    red_cells_measured: int = 0


@dataclass
class SmearDetections:
    scale: Scale
    cells: list[Detection] = field(default_factory=list)
    labels: np.ndarray | None = None  # (H, W) int32 cell instance labels at the input size
    work_scale: float = 1.0  # input pixels per working pixel (the larger of the two axes' factors)
    rejected: int = 0  # purple objects too large for one white cell (clumps, smudges): not classified
    rejected_at: list[tuple[float, float]] = field(default_factory=list)  # their centres, input pixels


def background_relative(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in about [0, 1.2]: each channel over the bright background around it.

    The background is measured per block (a grid of about 6 x 6) and interpolated, because many
    cameras light the field unevenly: against one global level, the darker corners of the
    background would count as stained.
    """
    x = rgb.astype(np.float32) + 1.0
    h, w = x.shape[:2]
    flat = x.reshape(-1, 3)
    if flat.shape[0] > 200_000:  # the percentile of a sample is as good and 10x faster
        flat = flat[:: flat.shape[0] // 200_000 + 1]
    top = np.percentile(flat, 97, axis=0).astype(np.float32)
    n = 6 if min(h, w) >= 96 else 1
    ys = np.linspace(0, h, n + 1).astype(int)
    xs = np.linspace(0, w, n + 1).astype(int)
    grid = np.empty((n, n, 3), np.float32)
    for i in range(n):
        for j in range(n):
            block = x[ys[i]:ys[i + 1]:2, xs[j]:xs[j + 1]:2].reshape(-1, 3)
            grid[i, j] = np.percentile(block, 95, axis=0)
    # A block covered by cells has no background of its own: it may not fall far below the image's.
    grid = np.clip(grid, 0.85 * top, top)
    if n == 1:
        bg = grid[0, 0]
    else:
        bg = np.stack([np.asarray(Image.fromarray(grid[..., c], "F").resize((w, h), Image.BILINEAR))
                       for c in range(3)], axis=2)
    return np.clip(x / np.maximum(bg, 8.0), 0.0, 1.2)


def stain_maps(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``purple`` (nuclei) and ``stained`` (darkness in green: anything on the slide), both (H, W)."""
    n = background_relative(rgb)
    purple = n[..., 2] - n[..., 1]
    stained = 1.0 - n[..., 1]
    return purple, stained


def otsu(values: np.ndarray, bins: int = 128) -> float:
    if values.size < 16:
        return float("inf")
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def _circularity(mask: np.ndarray) -> float:
    area = float(mask.sum())
    if area == 0:
        return 0.0
    edge = mask & ~ndi.binary_erosion(mask)
    perimeter = max(float(edge.sum()), 1.0)
    return float(min(1.0, 4 * math.pi * area / (perimeter * perimeter) * 0.79))  # 0.79: pixel-edge bias


def estimate_scale(stained: np.ndarray, nuclei: np.ndarray) -> Scale:
    """Microns per (working) pixel from the red cells (stained blobs away from nuclei).

    Red cells often touch, so they are not measured one by one: the distance transform of the
    stained area peaks near each cell's centre at about its radius, also inside clumps. The median
    peak, weighted by area, is the red-cell radius.
    """
    # The white cell's own cytoplasm is not a red cell: leave out a margin around each nucleus
    # that scales with the nuclei.
    lab, n = ndi.label(nuclei)
    margin = 3.0
    if n:
        areas = ndi.sum(nuclei, lab, np.arange(1, n + 1))
        margin = max(margin, MARGIN_NUCLEI * math.sqrt(4 * float(np.max(areas)) / math.pi))
    near_nuclei = ndi.distance_transform_edt(~nuclei) <= margin if n else nuclei
    # Otsu between background and red cells (nuclei left out, or it would split nuclei from red cells)
    fg = stained > max(STAIN_MIN, RBC_OTSU_FRACTION * otsu(stained[~near_nuclei]))
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=1))  # rings with a pale centre
    fg &= ~near_nuclei
    dist = ndi.distance_transform_edt(fg)
    plateaus, n = ndi.label((dist == ndi.maximum_filter(dist, size=5)) & (dist >= 2.5))
    # A cell centre is the highest point within its own radius; rim and gap maxima are not.
    radii = []
    for sl in ndi.find_objects(plateaus):
        y, x = sl[0].start, sl[1].start
        r = dist[y, x]
        k = int(r)
        if dist[max(0, y - k):y + k + 1, max(0, x - k):x + k + 1].max() <= r:
            radii.append(r)
    radii = np.asarray(radii)
    if radii.size < MIN_RED_CELLS:
        return Scale(0.0, "default")
    # Cut, folded and overlapping cells and specks give smaller peaks, never larger: the median
    # weighted by area (r^2) is the typical whole red cell.
    radii = np.sort(radii)
    cum = np.cumsum(radii ** 2)
    radius = float(radii[np.searchsorted(cum, 0.5 * cum[-1])])
    return Scale(RBC_DIAMETER_UM / (2 * radius + 1.0), "red_cells", int(radii.size))


def _work_image(rgb: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The image detection runs on, and input pixels per working pixel along x and y."""
    h, w = rgb.shape[:2]
    f = max(h, w) / WORK_MAX_SIDE
    if f <= 1.0:
        return rgb, 1.0, 1.0
    small = Image.fromarray(rgb).resize((max(1, round(w / f)), max(1, round(h / f))), Image.BOX)
    return np.asarray(small), w / small.size[0], h / small.size[1]


def find_nuclei(purple: np.ndarray, stained: np.ndarray) -> np.ndarray:
    """Nucleus mask by hysteresis on ``purple + stained``.

    Seeds must stand ``SEED_MARGIN`` above the typical stained pixel (the red cells, in a field),
    so a field without white cells has no seeds; the nucleus then grows from its seeds down to
    the Otsu level between red cells and nuclei.
    """
    score = purple + stained
    fg = stained > STAIN_MIN
    if fg.sum() < 16:
        return np.zeros(score.shape, bool)
    high = max(SEED_FLOOR, float(np.median(score[fg])) + SEED_MARGIN)
    seeds = ndi.binary_opening(score > high, iterations=1)
    if not seeds.any():
        return seeds
    low = min(high, max(LOW_FLOOR, otsu(score[fg])))
    grown, _ = ndi.label(score > low)
    keep = np.unique(grown[seeds])
    return ndi.binary_opening(np.isin(grown, keep[keep > 0]), iterations=1)


def detect(rgb: np.ndarray, microns_per_pixel: float | None = None) -> SmearDetections:
    """White cells of a smear image (``microns_per_pixel`` of the input, when known, skips the estimate).

    An image too large to shrink to ``WORK_MAX_SIDE`` without losing its red cells (a stitched
    field, a 100x scan) is detected in overlapping tiles at a working scale of about
    ``TILE_WORK_UM`` µm per pixel.
    """
    if microns_per_pixel is not None and not (math.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise ValueError(f"microns_per_pixel must be a positive number, got {microns_per_pixel!r}")
    out = _detect_once(rgb, microns_per_pixel)
    scale = _tiling_scale(rgb, out)
    return out if scale is None else _detect_tiled(rgb, scale)


def _detect_once(rgb: np.ndarray, microns_per_pixel: float | None) -> SmearDetections:
    work, fx, fy = _work_image(rgb)
    f = max(fx, fy)
    purple, stained = stain_maps(work)
    nuclei = find_nuclei(purple, stained)
    if microns_per_pixel:
        scale = Scale(microns_per_pixel * f, "given")
    else:
        scale = estimate_scale(stained, nuclei)
        if scale.method == "red_cells" and not _plausible(scale, nuclei, f):
            scale = Scale(0.0, "default")  # the "red cells" were cytoplasm, debris or not cells at all
    cells, labels, rejected = _cells(purple, stained, nuclei, scale, work.shape[:2])
    if scale.method == "default":
        scale = _scale_from_white_cells(cells)
        if scale.method != "default":  # sizes filter by microns: run again at the better scale
            cells, labels, rejected = _cells(purple, stained, nuclei, scale, work.shape[:2])
    out = SmearDetections(scale=Scale(scale.microns_per_pixel / f, scale.method, scale.red_cells_measured),
                          work_scale=f, rejected=len(rejected))
    out.cells = [_to_input(c, fx, fy, rgb.shape[:2]) for c in cells]
    out.rejected_at = [((x + 0.5) * fx - 0.5, (y + 0.5) * fy - 0.5) for x, y in rejected]
    out.labels = labels if f == 1.0 else np.asarray(
        Image.fromarray(labels).resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))
    return out


def _tiling_scale(rgb: np.ndarray, once: SmearDetections) -> Scale | None:
    """The input's scale when it must be detected in tiles (None: the single pass is fine)."""
    if max(rgb.shape[:2]) <= TILE_ABOVE_SIDE:
        return None
    def fine(scale: Scale) -> bool:
        return scale.microns_per_pixel * once.work_scale <= COARSEST_WORK_UM

    if once.scale.method == "given":
        return None if fine(once.scale) else once.scale
    if once.scale.method == "red_cells" and fine(once.scale):
        return None
    # Shrunk whole, the red cells were too small to measure well (or at all): measure them at full
    # resolution in the middle of the image.
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - WORK_MAX_SIDE) // 2), max(0, (w - WORK_MAX_SIDE) // 2)
    centre = _detect_once(rgb[y0:y0 + WORK_MAX_SIDE, x0:x0 + WORK_MAX_SIDE], None).scale
    return None if centre.method != "red_cells" or fine(centre) else centre


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile + 1, tile - overlap))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return starts


def _owner_cuts(starts: list[int], tile: int, n: int) -> list[float]:
    """Tile i owns the centres in [cuts[i], cuts[i + 1]): the middle of each overlap."""
    return [0.0] + [(b + min(a + tile, n)) / 2 for a, b in zip(starts, starts[1:])] + [float(n)]


def _detect_tiled(rgb: np.ndarray, scale: Scale) -> SmearDetections:
    h, w = rgb.shape[:2]
    mpp = scale.microns_per_pixel
    f = max(1.0, TILE_WORK_UM / mpp)
    tile = int(WORK_MAX_SIDE * f)
    overlap = min(tile // 2, int(math.ceil(MAX_CELL_UM / mpp)))  # a whole cell lies inside some tile
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    ycut, xcut = _owner_cuts(ys, tile, h), _owner_cuts(xs, tile, w)
    out = SmearDetections(scale=scale, work_scale=f, labels=np.zeros((h, w), np.int32))
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = _detect_once(rgb[y0:y0 + tile, x0:x0 + tile], mpp)

            def owned(x: float, y: float) -> bool:
                return xcut[j] <= x + x0 < xcut[j + 1] and ycut[i] <= y + y0 < ycut[i + 1]

            out.rejected += sum(owned(x, y) for x, y in part.rejected_at)
            keep = [k for k, c in enumerate(part.cells) if owned(*c.centroid)]
            lut = np.zeros(len(part.cells) + 1, np.int32)
            lut[[k + 1 for k in keep]] = np.arange(len(out.cells) + 1, len(out.cells) + 1 + len(keep))
            ids = lut[part.labels]
            region = out.labels[y0:y0 + tile, x0:x0 + tile]
            region[ids > 0] = ids[ids > 0]
            out.cells += [_shift(part.cells[k], x0, y0, (h, w)) for k in keep]
    return out


def _shift(c: Detection, dx: int, dy: int, shape: tuple[int, int]) -> Detection:
    h, w = shape
    x0, y0, x1, y1 = c.bbox[0] + dx, c.bbox[1] + dy, c.bbox[2] + dx, c.bbox[3] + dy
    return Detection(bbox=(x0, y0, x1, y1), centroid=(c.centroid[0] + dx, c.centroid[1] + dy), area_px=c.area_px,
                     nucleus_area_px=c.nucleus_area_px, circularity=c.circularity,
                     touches_border=bool(x0 == 0 or y0 == 0 or x1 == w or y1 == h))


def _plausible(scale: Scale, nuclei: np.ndarray, f: float) -> bool:
    mpp = scale.microns_per_pixel / f
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1] and _typical_nucleus_um(nuclei, scale) <= MAX_NUCLEUS_UM


def _typical_nucleus_um(nuclei: np.ndarray, scale: Scale) -> float:
    """Median nucleus (component) diameter: touching blasts merge into one large component, so not the
    largest."""
    lab, n = ndi.label(nuclei)
    if n == 0:
        return 0.0
    area = float(np.median(ndi.sum(nuclei, lab, np.arange(1, n + 1))))
    return math.sqrt(4 * area / math.pi) * scale.microns_per_pixel


def _scale_from_white_cells(cells: list[Detection]) -> Scale:
    if not cells:
        return Scale(0.0, "default")
    d = float(np.median([math.sqrt(4 * c.area_px / math.pi) for c in cells]))
    return Scale(WBC_DIAMETER_UM / d, "white_cell_size")


def _closed(mask: np.ndarray, radius_px: float) -> np.ndarray:
    return ndi.binary_fill_holes(ndi.binary_closing(mask, structure=_disk(radius_px), iterations=1) | mask)


def join_lobes(nuclei: np.ndarray, um: float) -> np.ndarray:
    """Nucleus pieces of one cell joined into one component.

    Pieces closer than ~2 µm always join. A segmented neutrophil's lobes can lie up to ~LOBE_GAP_UM
    apart: such pieces join only when the joined nucleus still fits in one cell
    (``MAX_LOBED_NUCLEUS_UM`` across), so two neighbouring cells stay two.
    """
    near = _closed(nuclei, max(1.0, 1.0 / um))
    wide = _closed(nuclei, max(1.0, LOBE_GAP_UM / 2 / um))
    wide_lab, n = ndi.label(wide)
    if n == 0:
        return near
    near_lab, _ = ndi.label(near)
    out = near.copy()
    for i, sl in enumerate(ndi.find_objects(wide_lab), start=1):
        pieces = np.unique(near_lab[sl][wide_lab[sl] == i])
        extent_um = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) * um
        if len(pieces[pieces > 0]) > 1 and extent_um <= MAX_LOBED_NUCLEUS_UM:
            out[sl] |= wide_lab[sl] == i
    return out


def _cells(purple: np.ndarray, stained: np.ndarray, nuclei: np.ndarray, scale: Scale,
           shape: tuple[int, int]) -> tuple[list[Detection], np.ndarray, list[tuple[float, float]]]:
    """Cells grown from the nuclei at this scale: (cells, instance labels, centres (x, y) of the objects
    rejected as too large)."""
    h, w = shape
    # With no scale yet, assume the cells are large (a single-cell crop): join generously.
    um = scale.microns_per_pixel or (WBC_DIAMETER_UM / (0.6 * min(h, w)))
    lab, n = ndi.label(join_lobes(nuclei, um))
    labels = np.zeros(shape, np.int32)
    if n == 0:
        return [], labels, []
    min_area = math.pi / 4 * (MIN_NUCLEUS_UM / um) ** 2
    max_area = math.pi / 4 * (MAX_CELL_UM / um) ** 2
    # cytoplasm: stained, bluish-or-neutral pixels within ~3 µm of the nucleus, nearest nucleus wins
    grow = max(2, round(3.0 / um))
    cyto = (stained > STAIN_MIN) & (purple > CYTOPLASM_MIN_PURPLE)
    dist, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
    owner = lab[iy, ix]
    cell_lab = np.where((dist <= grow) & (cyto | (lab > 0)), owner, 0).astype(np.int32)
    cells = []
    k = 0
    rejected = []
    for i, sl in enumerate(ndi.find_objects(cell_lab), start=1):
        if sl is None:
            continue
        nuc_area = float((lab[sl] == i).sum())
        if nuc_area < min_area:
            continue
        m = cell_lab[sl] == i
        m = ndi.binary_opening(m, iterations=1) | (lab[sl] == i)
        area = float(m.sum())
        if area > max_area:
            rejected.append(((sl[1].start + sl[1].stop) / 2, (sl[0].start + sl[0].stop) / 2))
            continue
        k += 1
        labels[sl][m] = k
        ys, xs = np.nonzero(m)
        y0, x0 = sl[0].start + ys.min(), sl[1].start + xs.min()
        y1, x1 = sl[0].start + ys.max() + 1, sl[1].start + xs.max() + 1
        cells.append(Detection(
            bbox=(int(x0), int(y0), int(x1), int(y1)),
            centroid=(float(sl[1].start + xs.mean()), float(sl[0].start + ys.mean())),
            area_px=area, nucleus_area_px=nuc_area, circularity=_circularity(m),
            touches_border=bool(x0 == 0 or y0 == 0 or x1 == w or y1 == h)))
    return cells, labels, rejected


def _to_input(c: Detection, fx: float, fy: float, shape: tuple[int, int]) -> Detection:
    """A detection on the working image in input pixels (pixel centres map to pixel centres)."""
    if fx == 1.0 and fy == 1.0:
        return c
    h, w = shape
    x0, y0, x1, y1 = c.bbox
    return Detection(bbox=(int(x0 * fx), int(y0 * fy), min(w, int(math.ceil(x1 * fx))), min(h, int(math.ceil(y1 * fy)))),
                     centroid=((c.centroid[0] + 0.5) * fx - 0.5, (c.centroid[1] + 0.5) * fy - 0.5),
                     area_px=c.area_px * fx * fy, nucleus_area_px=c.nucleus_area_px * fx * fy,
                     circularity=c.circularity, touches_border=c.touches_border)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """The slide's background: the median of the brightest tenth of the pixels (a sample on large images)."""
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 200_000:
        flat = flat[:: flat.shape[0] // 200_000 + 1]
    total = flat.sum(axis=1, dtype=np.int32)
    return np.median(flat[total >= np.percentile(total, 90)], axis=0).astype(np.uint8)


def crop_cell(rgb: np.ndarray, det: Detection, microns_per_pixel: float, out_px: int, field_um: float,
              background: np.ndarray | None = None) -> np.ndarray:
    """A square ``field_um`` µm window centred on the cell, resampled to ``out_px`` pixels (one physical
    scale for every source). Outside the image the window shows the slide's background colour:
    replicated edges would draw streaks that only cropped sources have, a shortcut for the classifier."""
    if not (math.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise ValueError(f"microns_per_pixel must be a positive number, got {microns_per_pixel!r}")
    h, w = rgb.shape[:2]
    side = min(field_um / microns_per_pixel, 4.0 * max(h, w))  # an absurd scale cannot allocate gigabytes
    cx, cy = det.centroid
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if _inside(rgb, det, microns_per_pixel, field_um):
        # Only the window (and the filter's reach around it) becomes a PIL image: a whole 64-megapixel
        # field copied per cell took 0.15 s a cell. Same pixels as resizing the whole image.
        m = int(math.ceil(0.5 * side / out_px)) + 2
        x0, y0 = max(0, int(math.floor(box[0])) - m), max(0, int(math.floor(box[1])) - m)
        x1, y1 = min(w, int(math.ceil(box[2])) + m), min(h, int(math.ceil(box[3])) + m)
        window = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
        return np.asarray(window.resize((out_px, out_px), Image.BILINEAR, reducing_gap=2.0,
                                        box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)))
    # only the window is padded: a canvas of the window's size, the part inside the image pasted in
    x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
    n = int(math.ceil(side)) + 2
    canvas = np.empty((n, n, 3), np.uint8)
    canvas[:] = background_colour(rgb) if background is None else background
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + n), min(h, y0 + n)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    inner = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    return np.asarray(Image.fromarray(canvas).resize((out_px, out_px), Image.BILINEAR, box=inner, reducing_gap=2.0))


def crop_cells(rgb: np.ndarray, cells: list[Detection], microns_per_pixel: float, out_px: int,
               field_um: float) -> np.ndarray:
    """(N, out_px, out_px, 3) crops of ``cells`` (see :func:`crop_cell`); the background colour is
    measured once, and only when a window leaves the image."""
    background = None
    out = np.empty((len(cells), out_px, out_px, 3), np.uint8)
    for i, c in enumerate(cells):
        if background is None and not _inside(rgb, c, microns_per_pixel, field_um):
            background = background_colour(rgb)
        out[i] = crop_cell(rgb, c, microns_per_pixel, out_px, field_um, background)
    return out


def _inside(rgb: np.ndarray, det: Detection, microns_per_pixel: float, field_um: float) -> bool:
    h, w = rgb.shape[:2]
    half = min(field_um / microns_per_pixel, 4.0 * max(h, w)) / 2
    cx, cy = det.centroid
    return cx - half >= 0 and cy - half >= 0 and cx + half <= w and cy + half <= h


# A cell's picture for people (gallery, report): the same for every source
THUMB_PX = 96
THUMB_UM = 24.0  # a whole blast (up to ~20 µm) with a margin


def stored_cell_crop(rgb: np.ndarray, cell: dict, microns_per_pixel: float | None, out_px: int,
                     field_um: float) -> np.ndarray:
    """A crop of a cell as an analysis stored it (``bbox``, ``centroid``), ``field_um`` µm across;
    without a measured scale, framed by 1.6 times its own box instead."""
    x0, y0, x1, y1 = cell["bbox"]
    det = Detection(bbox=(x0, y0, x1, y1), centroid=tuple(cell.get("centroid") or ((x0 + x1) / 2, (y0 + y1) / 2)),
                    area_px=0.0, nucleus_area_px=0.0, circularity=0.0, touches_border=False)
    if microns_per_pixel:
        return crop_cell(rgb, det, microns_per_pixel, out_px, field_um)
    return crop_cell(rgb, det, 1.0, out_px, 1.6 * max(x1 - x0, y1 - y0, 1))
