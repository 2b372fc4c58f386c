"""Generated images: non-smear inputs for the out-of-domain evaluation, and
smear-like fields for tests and benchmarks when no dataset is present."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("noise", "flat", "text", "gradient", "checkerboard", "photo", "shapes", "grayscale_noise")


def _rng(seed):
    return np.random.default_rng(seed)


def noise(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    if r.random() < 0.5:
        return r.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.clip(r.normal(128, r.uniform(10, 80), (size, size, 3)), 0, 255).astype(np.uint8)


def flat(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    a = np.empty((size, size, 3), np.uint8)
    a[:] = r.integers(0, 256, 3)
    # a little sensor noise so it is not exactly constant
    return np.clip(a + r.normal(0, 3, a.shape), 0, 255).astype(np.uint8)


def text(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    bg = tuple(int(v) for v in r.integers(180, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(r.integers(12, 28)))
    words = ["Patient", "report", "glucose", "mg/dL", "hemoglobin", "Invoice", "TOTAL", "2026", "scan", "page"]
    y = 4
    while y < size - 20:
        line = " ".join(r.choice(words, int(r.integers(2, 5))))
        d.text((int(r.integers(0, 20)), y), line, fill=tuple(int(v) for v in r.integers(0, 90, 3)), font=font)
        y += int(r.integers(16, 34))
    return np.asarray(img)


def gradient(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    c0, c1 = r.integers(0, 256, 3), r.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    a = (c0 * (1 - t) + c1 * t) * np.ones((size, 1, 1))
    return np.clip(a, 0, 255).astype(np.uint8)


def checkerboard(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    k = int(r.integers(4, 40))
    yy, xx = np.mgrid[:size, :size]
    m = ((yy // k + xx // k) % 2).astype(bool)
    a = np.empty((size, size, 3), np.uint8)
    a[m] = r.integers(0, 256, 3)
    a[~m] = r.integers(0, 256, 3)
    return a


def photo(seed: int, size: int = 224) -> np.ndarray:
    """A synthetic outdoor 'photo': sky gradient, sun, hills, trees, blur."""
    r = _rng(seed)
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    sky0, sky1 = np.array([90, 150, 230]) + r.integers(-30, 30, 3), np.array([200, 220, 250]) + r.integers(-20, 5, 3)
    for y in range(size):
        t = y / size
        d.line([(0, y), (size, y)], fill=tuple(int(v) for v in np.clip(sky0 * (1 - t) + sky1 * t, 0, 255)))
    sx, sy, sr = int(r.integers(20, size - 20)), int(r.integers(10, size // 3)), int(r.integers(8, 25))
    d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 230, 120))
    for _ in range(int(r.integers(2, 4))):
        base = int(r.integers(size // 2, size))
        pts = [(0, size)] + [(x, base - int(r.integers(0, size // 4))) for x in range(0, size + 1, size // 6)] + [(size, size)]
        d.polygon(pts, fill=tuple(int(v) for v in (r.integers(20, 90), r.integers(90, 170), r.integers(20, 80))))
    for _ in range(int(r.integers(0, 6))):
        x, y = int(r.integers(0, size)), int(r.integers(size // 2, size))
        d.rectangle([x - 2, y, x + 2, y + 20], fill=(90, 60, 30))
        d.ellipse([x - 10, y - 18, x + 10, y + 4], fill=(30, int(r.integers(90, 140)), 40))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)))


def shapes(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in r.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(r.integers(3, 12))):
        x0, y0 = r.integers(0, size, 2)
        w, h = r.integers(10, size // 2, 2)
        fill = tuple(int(v) for v in r.integers(0, 256, 3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=fill)
    return np.asarray(img)


def grayscale_noise(seed: int, size: int = 224) -> np.ndarray:
    r = _rng(seed)
    g = Image.fromarray(r.integers(0, 256, (size // 8, size // 8), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(g.convert("RGB"))


GENERATORS = {k: globals()[k] for k in KINDS}


def non_smear_images(n_per_kind: int = 20, seed: int = 0, size: int = 224):
    """Yield (kind, rgb) pairs for every generator."""
    for k, fn in GENERATORS.items():
        for i in range(n_per_kind):
            yield k, fn(seed * 100003 + i, size)


def smear_like(seed: int, size: int = 224, n_wbc: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A crude smear-like field: pale background, pink red-cell rings, purple white cells.

    Returns (rgb, wbc_mask). Used by tests and benchmarks; not a substitute for real data.
    """
    r = _rng(seed)
    bg = np.array([235, 228, 240]) + r.integers(-10, 10, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    for _ in range(int(size * size / 700)):
        x, y = r.integers(0, size, 2)
        rad = int(r.integers(7, 11))
        d.ellipse([int(x - rad), int(y - rad), int(x + rad), int(y + rad)], outline=(200, 160, 190), width=3,
                  fill=(225, 200, 220))
    mask = Image.new("L", (size, size), 0)
    dm = ImageDraw.Draw(mask)
    for _ in range(n_wbc if n_wbc is not None else int(r.integers(1, 5))):
        x, y = r.integers(20, size - 20, 2)
        rad = int(r.integers(12, 18))
        box = [int(x - rad), int(y - rad), int(x + rad), int(y + rad)]
        d.ellipse(box, fill=(int(r.integers(90, 140)), int(r.integers(50, 90)), int(r.integers(150, 200))))
        dm.ellipse(box, fill=255)
    rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)))
    rgb = np.clip(rgb + r.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, np.asarray(mask) > 127


def smear_field(seed: int, microns_per_pixel: float, size: tuple[int, int] = (320, 240),
                white_cells: list[tuple[float, float, float]] | None = None,
                stain: str = "giemsa") -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """A smear field of known physical scale: 7.5 µm red cells (pale centre, some touching) and
    white cells given as (x, y, diameter µm) with a purple nucleus of 60% of that diameter.

    ``stain`` "giemsa" (pink red cells on beige) or "pale" (lilac on blue-white, like some cameras).
    Returns (rgb, white_cells). For tests of detection and scale; not a substitute for real data.
    """
    r = _rng(seed)
    w, h = size
    if stain == "giemsa":
        bg, rbc_rim, rbc_fill, cyto, nuc = (232, 214, 205), (196, 120, 130), (214, 160, 165), (215, 190, 215), (95, 45, 140)
    else:
        bg, rbc_rim, rbc_fill, cyto, nuc = (228, 232, 245), (175, 170, 205), (200, 196, 225), (205, 195, 235), (120, 85, 200)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    if white_cells is None:
        white_cells = [(w * 0.3, h * 0.5, 12.0), (w * 0.72, h * 0.4, 10.0)]
    rad = 7.5 / 2 / microns_per_pixel
    wbc = [(x, y, dia / 2 / microns_per_pixel) for x, y, dia in white_cells]
    placed: list[tuple[float, float]] = []
    for _ in range(int(1.2 * w * h / (np.pi * rad * rad))):  # tries; about 40% of the field ends up covered
        x, y = r.uniform(-rad, w + rad), r.uniform(-rad, h + rad)
        if any((x - cx) ** 2 + (y - cy) ** 2 < (cr + rad) ** 2 for cx, cy, cr in wbc):
            continue
        if any((x - px) ** 2 + (y - py) ** 2 < (1.85 * rad) ** 2 for px, py in placed):
            continue  # red cells touch and overlap a little, as on a good monolayer
        placed.append((x, y))
        rr = rad * r.uniform(0.92, 1.08)
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=rbc_rim)
        d.ellipse([x - rr * 0.72, y - rr * 0.72, x + rr * 0.72, y + rr * 0.72], fill=rbc_fill)
    for x, y, cr in wbc:
        d.ellipse([x - cr, y - cr, x + cr, y + cr], fill=cyto)
        nr = cr * 0.6
        d.ellipse([x - nr, y - nr, x + nr, y + nr], fill=nuc)
    rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(max(0.5, 0.3 / microns_per_pixel))))
    rgb = np.clip(rgb + r.normal(0, 2.5, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, list(white_cells)


def radiograph_like(seed: int, width: int = 240, height: int = 320) -> np.ndarray:
    """A crude grayscale radiograph: dark background, a soft-tissue band and two bright long bones
    with darker marrow. For tests and benchmarks of the radiology pipeline; not real data."""
    r = _rng(seed)
    img = Image.new("L", (width, height), int(r.integers(5, 25)))
    d = ImageDraw.Draw(img)
    cx = width // 2 + int(r.integers(-10, 10))
    d.rectangle([cx - width // 4, 0, cx + width // 4, height], fill=int(r.integers(60, 90)))
    for off in (-width // 9, width // 9):
        w = width // 14
        d.rectangle([cx + off - w, height // 10, cx + off + w, height - height // 10], fill=int(r.integers(190, 230)))
        d.rectangle([cx + off - w // 3, height // 8, cx + off + w // 3, height - height // 8], fill=int(r.integers(120, 150)))
    gray = np.asarray(img.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float64)
    gray = np.clip(gray + r.normal(0, 4, gray.shape), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
