"""Hostile-input fuzzing (hypothesis) of every upload and form endpoint, HTML and JSON API.

Inputs: random bytes and crafted hostile files as images (polyglots, decompression bombs with giant
declared dimensions, EXIF / ICC / text-chunk bombs, truncated and zero-byte files, page and scan
bombs), hostile file names (path traversal, NUL, very long, unicode, right-to-left overrides), and
in every text field: arbitrary unicode (astral plane, combining marks, NUL; lone surrogates where
the transport carries them, i.e. JSON), overlong values (10x the column limit), SQL injection and
HTML / JS / template injection strings.

Properties checked for every input:

1. never a 5xx (an exception escaping the app counts as one: TESTING propagates it);
2. nothing stored half-way: a rejected request leaves the row counts of every table and the set of
   files under the image store unchanged; an accepted one stores complete, consistent data (each
   case_images row has its original and thumbnail on disk and an analyses row, no file in the store
   belongs to no row, no temp files), equal to what was sent (after the documented trimming);
3. no reflected or stored XSS: the pages that render the input (patient list / search, patient page,
   case page, history, admin users, tokens, error pages, flash messages) never contain an injection
   payload unescaped, nor any active content (inline script, on* handler, javascript: URL); JSON API
   answers are application/json.

One app (a copy of the seeded world) is shared by the examples of a test function; every property
is checked relative to a snapshot taken just before each request.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import struct
import time
import urllib.parse
import uuid
import warnings
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from PIL import Image
from sqlalchemy import func, select

from oncoscope.imaging.imageio import ImageLoadError, load_image
from oncoscope.store.models import (Analysis, ApiToken, Case, CaseImage, Patient, PatientAccess, Review, User)
from oncoscope.store.text import clean_filename

from .conftest import (ADMIN, CASE_A_ID, DOC_A, PATIENT_A_ID, PATIENT_B_ID, SPARE, files_of, flashes, login,
                       one, q, sessions_of)


def fuzz(n: int):
    """Hypothesis settings; ONCOSCOPE_FUZZ_SCALE=10 runs ten times as many examples (a deeper local run)."""
    return settings(max_examples=n * int(os.environ.get("ONCOSCOPE_FUZZ_SCALE", "1")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the malformed metadata

TABLES = (Patient, PatientAccess, Case, CaseImage, Analysis, Review, User, ApiToken)
MULTIPART_BOUNDARY = "----hostile-boundary-7MA4YWxkTrZu0gW"

# ============================================================================ hostile text
INJECTIONS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "</textarea><script>alert(1)</script>",
    "</title><script>alert(1)</script>",
    "<a href=\"javascript:alert(1)\">x</a>",
    "javascript:alert(1)",
    "<iframe src=\"javascript:alert(1)\"></iframe>",
    "{{7*7}}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{x}}{% endfor %}",
    "${7*7}#{7*7}",
    "' OR '1'='1",
    "'; DROP TABLE patients; --",
    "Robert'); DROP TABLE users;--",
    "1 UNION SELECT password_hash FROM users --",
    "%' OR 1=1 --",
    "\\'; SELECT sqlite_version(); --",
]
ACTIVE = re.compile(r"[<>\"']")  # a payload with one of these would do harm unescaped
WEIRD = ["\x00", "a\x00b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀", "e\u0301\u0301\u0301\u0301", "Z\u0337\u0322\u034ea\u0338l",
         "\u202egnp.exe", "\ufeff\u200b\u2028\u2029", "\r\n\t", "\uffff\ufffe", "ﷺ" * 3, "Ⅻ", "İı", "ß"]


def chars(surrogates: bool = False):
    """Any code point, NUL and astral plane included; lone surrogates only where asked (JSON)."""
    base = st.characters(exclude_categories=["Cs"])
    return st.one_of(base, st.characters(categories=["Cs"])) if surrogates else base


def hostile_text(limit: int, surrogates: bool = False):
    """Text for a field of at most ``limit`` characters: injections, unicode, overlong values."""
    c = chars(surrogates)
    piece = st.one_of(st.sampled_from(INJECTIONS), st.sampled_from(WEIRD), st.text(c, max_size=12))
    return st.one_of(
        st.sampled_from(INJECTIONS),
        st.text(c, max_size=30),
        st.lists(piece, min_size=1, max_size=4).map("".join),
        st.tuples(st.sampled_from(["x", "é", "𝔘", "<", "'", "\u0301"]),
                  st.sampled_from([limit, limit + 1, 10 * limit])).map(lambda t: t[0] * t[1]),
    )


def injection_text():
    """Text that always carries an injection payload (plus some unicode around it)."""
    return st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4),
                     st.sampled_from(INJECTIONS)).map(lambda t: (t[0] + t[1]).strip() or t[1])


# ============================================================================ properties

def stored_files(app) -> set[str]:
    root = files_of(app).root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def snapshot(app) -> dict:
    with sessions_of(app)() as s:
        rows = {m.__tablename__: s.scalar(select(func.count()).select_from(m)) for m in TABLES}
    return {"rows": rows, "files": stored_files(app)}


def assert_unchanged(app, before: dict, what: str = "") -> None:
    after = snapshot(app)
    assert after["rows"] == before["rows"], f"rejected request changed rows {what}: {before['rows']} -> {after['rows']}"
    assert after["files"] == before["files"], f"rejected request changed files {what}: " \
                                              f"{sorted(after['files'] ^ before['files'])[:6]}"


def assert_consistent(app) -> None:
    """Every image row has its files and an analysis; every stored file belongs to an image row."""
    store = files_of(app)
    with sessions_of(app)() as s:
        images = s.execute(select(CaseImage.id, CaseImage.sha256, CaseImage.original_filename, CaseImage.width,
                                  CaseImage.height, CaseImage.size_bytes)).all()
        analysed = set(s.scalars(select(Analysis.image_id)))
    for iid, sha, name, w, h, size in images:
        assert store.exists(sha) and store.exists(sha, "thumb"), f"image {iid}: file missing"
        assert store.path(sha).stat().st_size == size, f"image {iid}: size differs"
        assert hashlib.sha256(store.path(sha).read_bytes()).hexdigest() == sha
        assert iid in analysed, f"image {iid} has no analyses row"
        assert name and name == clean_filename(name), f"image {iid}: unsafe stored file name {name!r}"
        assert w >= 16 and h >= 16
    shas = {sha for _, sha, *_ in images}
    on_disk = {p.name for p in store.root.glob("*/*/*") if p.is_dir()}
    assert on_disk <= shas, f"files that belong to no image row: {sorted(on_disk - shas)[:4]}"
    assert not [p for p in store.root.rglob(".tmp-*")], "temporary files left behind"


def no_5xx(r, what: str = "") -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.data[:300]!r}"


def assert_json(r, what: str = "") -> None:
    no_5xx(r, what)
    assert r.mimetype == "application/json", f"{what}: {r.mimetype} {r.data[:200]!r}"
    json.loads(r.data)


class _ActiveContent(HTMLParser):
    URL_ATTRS = {"href", "src", "action", "formaction", "data", "xlink:href", "poster", "background"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if tag == "script" and not d.get("src"):
            self.found.append("inline <script>")
        if tag in ("iframe", "frame", "object", "embed", "base"):
            self.found.append(f"<{tag}>")
        for k, v in attrs:
            if k.startswith("on"):
                self.found.append(f"<{tag} {k}=...>")
            if k in self.URL_ATTRS and v:
                scheme = re.sub(r"[\x00-\x20]", "", v).lower()
                if scheme.startswith(("javascript:", "vbscript:", "data:text/html")):
                    self.found.append(f"<{tag} {k}={v[:40]}>")


def assert_safe_html(body: bytes, payloads=(), where: str = "") -> None:
    """No raw injection payload and no active content the app did not write itself."""
    text = body.decode("utf-8", "replace")
    for p in payloads:
        if isinstance(p, str) and ACTIVE.search(p) and len(p) >= 4:
            assert p not in text, f"{where}: unescaped payload {p[:60]!r}"
    parser = _ActiveContent()
    parser.feed(text)
    assert not parser.found, f"{where}: active content in the page: {parser.found[:5]}"


def payloads_in(*values) -> list[str]:
    """The injection payloads carried by the given values (to look for them unescaped)."""
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
            out += [p for p in INJECTIONS if p in v]
    return out


def follow(c, r):
    """The page a redirect leads to (flash messages are rendered there)."""
    return c.get(r.headers["Location"]) if r.status_code in (301, 302, 303) else r


def h(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ============================================================================ hostile files
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 40, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_declaring(w: int, h: int) -> bytes:
    """A PNG header that claims w x h pixels, with a few bytes of image data."""
    return (PNG_SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _png_with_chunks(chunks: bytes, seed: int = 1) -> bytes:
    """A valid PNG with extra chunks inserted right after IHDR."""
    p = _encode(_noise(seed=seed), "PNG")
    return p[:33] + chunks + p[33:]


def _jpeg_declaring(w: int, h: int) -> bytes:
    j = bytearray(_encode(_noise(), "JPEG"))
    i = j.index(b"\xff\xc0")
    j[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(j)


def _tiff_declaring(w: int, h: int) -> bytes:
    t = bytearray(_encode(_noise(), "TIFF"))
    off = struct.unpack("<I", t[4:8])[0]
    for k in range(struct.unpack("<H", t[off:off + 2])[0]):
        e = off + 2 + 12 * k
        tag = struct.unpack("<H", t[e:e + 2])[0]
        if tag in (256, 257):
            t[e + 2:e + 4] = struct.pack("<H", 4)
            t[e + 4:e + 8] = struct.pack("<I", 1)
            t[e + 8:e + 12] = struct.pack("<I", w if tag == 256 else h)
    return bytes(t)


def _bmp_declaring(w: int, h: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)


def _tiff_with_pages(n: int) -> bytes:
    """n chained 16x16 pages sharing one strip: small, but Pillow walks the chain in quadratic time."""
    w = hh = 16
    pix = bytes(w * hh)
    entries = [(256, 3, w), (257, 3, hh), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 3, hh), (279, 4, w * hh)]
    size = 2 + 12 * len(entries) + 4
    first = 8 + len(pix)
    out = [b"II*\0" + struct.pack("<I", first) + pix]
    for k in range(n):
        ifd = struct.pack("<H", len(entries))
        for tag, typ, val in entries:
            ifd += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
        out.append(ifd + struct.pack("<I", first + (k + 1) * size if k < n - 1 else 0))
    return b"".join(out)


def _jpeg_with_scans(extra: int) -> bytes:
    """A progressive JPEG of a flat image with one tiny refinement scan repeated ``extra`` times:
    every scan re-processes the whole image (a small file that decodes for minutes at 8000x8000)."""
    j = _encode(Image.new("L", (512, 512), 128), "JPEG", progressive=True)
    scans, i = [], 2
    while i < len(j) and j[i + 1] != 0xD9:
        end = i + 2 + struct.unpack(">H", j[i + 2:i + 4])[0]
        if j[i + 1] == 0xDA:
            while not (j[end] == 0xFF and j[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((i, end))
        i = end
    s, e = min(scans, key=lambda x: x[1] - x[0])
    return j[:scans[-1][1]] + j[s:e] * extra + b"\xff\xd9"


def _exif_jpeg(tiff_body: bytes) -> bytes:
    j = _encode(_noise(64, 48, 5), "JPEG")
    payload = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + tiff_body
    return j[:2] + b"\xff\xe1" + struct.pack(">H", len(payload[:65530]) + 2) + payload[:65530] + j[2:]


def _ifd(entries, next_off: int = 0) -> bytes:
    out = struct.pack("<H", len(entries))
    for tag, typ, cnt, val in entries:
        out += struct.pack("<HHI", tag, typ, cnt) + (val if isinstance(val, bytes) else struct.pack("<I", val))
    return out + struct.pack("<I", next_off)


ORIENT6 = (0x0112, 3, 1, struct.pack("<HH", 6, 0))


def _exif_deep_chain(depth: int) -> bytes:
    size = 2 + 12 * 2 + 4
    return b"".join(_ifd([ORIENT6, (0x8769, 4, 1, 8 + (d + 1) * size)], 8 + (d + 1) * size if d < depth - 1 else 0)
                    for d in range(depth))


def _icc_bomb_jpeg() -> bytes:
    """A JPEG carrying a 1 MB (random) ICC profile split over 17 APP2 segments."""
    icc = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    parts = [icc[i:i + 65000] for i in range(0, len(icc), 65000)]
    segs = b"".join(b"\xff\xe2" + struct.pack(">H", len(p) + 16) + b"ICC_PROFILE\0" + bytes([k + 1, len(parts)]) + p
                    for k, p in enumerate(parts))
    j = _encode(_noise(seed=6), "JPEG")
    return j[:2] + segs + j[2:]


SCRIPT = b"<script>alert(1)</script>"


def _good(fmt: str, seed: int) -> bytes:
    img = _noise(seed=seed)
    return _encode(img.convert("P") if fmt == "GIF" else img, fmt)


def _zip_member() -> bytes:
    return b"PK\x03\x04" + b"\0" * 26 + b"evil.html" + SCRIPT


# name -> (builder, expectation): 'ok', or 'refused:<words of the message>'. Built lazily, once.
CRAFTED = {
    # polyglots
    "png+html.png": (lambda: _good("PNG", 1) + b"<html>" + SCRIPT + b"</html>", "ok"),
    "png+zip.png": (lambda: _good("PNG", 1) + _zip_member(), "ok"),
    "gif+js.gif": (lambda: _good("GIF", 2) + b"*/alert(1)//", "ok"),
    "jpeg+html.jpg": (lambda: _good("JPEG", 3) + SCRIPT, "ok"),
    "gif-header-script.gif": (lambda: b"GIF89a/*\x10\x00\x10\x00\x00\x00\x00;*/=0;alert(1)//", "refused:recognised"),
    "pdf-with-png.png": (lambda: b"%PDF-1.4\n1 0 obj<<>>stream\n" + _good("PNG", 1) + b"\nendstream",
                         "refused:recognised"),
    "zip-with-png.png": (lambda: _zip_member() + _good("PNG", 1), "refused:recognised"),
    "svg-script.png": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">' + SCRIPT + b"</svg>",
                       "refused:recognised"),
    "html.png": (lambda: b"<!doctype html><html><body>" + SCRIPT + b"</body></html>", "refused:recognised"),
    # formats outside the documented list (Pillow would decode many more)
    "image.tga": (lambda: _good("TGA", 4), "refused:recognised"),
    "image.pcx": (lambda: _good("PCX", 4), "refused:recognised"),
    "image.ico": (lambda: _good("ICO", 4), "refused:recognised"),
    "image.eps.png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n" + b"showpage\n" * 4,
                      "refused:recognised"),
    # giant declared dimensions (decompression bombs)
    "png-100000x100000.png": (lambda: _png_declaring(100_000, 100_000), "refused:pixels"),
    "png-9000x9000.png": (lambda: _png_declaring(9000, 9000), "refused:pixels"),
    "png-1x70000000.png": (lambda: _png_declaring(1, 70_000_000), "refused:pixels"),
    "jpeg-65000x65000.jpg": (lambda: _jpeg_declaring(65000, 65000), "refused:pixels"),
    "tiff-100000x100000.tif": (lambda: _tiff_declaring(100_000, 100_000), "refused:pixels"),
    "bmp-60000x60000.bmp": (lambda: _bmp_declaring(60000, 60000), "refused:pixels"),
    "png-8x8.png": (lambda: _encode(_noise(8, 8), "PNG"), "refused:at least"),
    # metadata bombs
    "png-ztxt-bomb.png": (lambda: _png_with_chunks(_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"A" * 20_000_000, 9))),
                          "refused:opened"),
    "png-iccp-bomb.png": (lambda: _png_with_chunks(_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"A" * 20_000_000, 9))),
                          "refused:opened"),
    "png-3000-text-chunks.png": (lambda: _png_with_chunks(b"".join(_chunk(b"tEXt", b"k%d\0" % i + b"v" * 300)
                                                                   for i in range(3000))), "ok"),
    "jpeg-exif-self-loop.jpg": (lambda: _exif_jpeg(_ifd([ORIENT6, (0x8769, 4, 1, 8), (0x8825, 4, 1, 8)], 8)), "ok"),
    "jpeg-exif-deep-chain.jpg": (lambda: _exif_jpeg(_exif_deep_chain(2000)), "ok"),
    "jpeg-exif-huge-count.jpg": (lambda: _exif_jpeg(_ifd([ORIENT6, (0x010E, 2, 0xFFFFFFFF, 100)])), "ok"),
    "jpeg-exif-5000-entries.jpg": (lambda: _exif_jpeg(_ifd([ORIENT6] + [(0x9000 + k, 7, 4, b"abcd")
                                                                         for k in range(5000)])), "ok"),
    "png-exif-loop.png": (lambda: _png_with_chunks(_chunk(b"eXIf", b"II*\0" + struct.pack("<I", 8)
                                                          + _ifd([ORIENT6, (0x8769, 4, 1, 8)], 8))), "ok"),
    "jpeg-icc-1mb.jpg": (_icc_bomb_jpeg, "ok"),
    # damaged
    "zero-bytes.png": (lambda: b"", "refused:empty"),
    "truncated.png": (lambda: _good("PNG", 1)[:len(_good("PNG", 1)) // 2], "refused:"),
    "truncated.jpg": (lambda: _good("JPEG", 3)[:len(_good("JPEG", 3)) // 2], "refused:"),
    "truncated.gif": (lambda: _good("GIF", 2)[:len(_good("GIF", 2)) // 2], "refused:"),
    "crc-damaged.png": (lambda: (lambda p: p[:-20] + bytes([p[-20] ^ 0xFF]) + p[-19:])(_good("PNG", 1)),
                        "refused:checksum"),
    "random.bin": (lambda: np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                   "refused:recognised"),
    # work bombs: small files that took minutes to parse (regressions)
    "tiff-5000-pages.tif": (lambda: _tiff_with_pages(5000), "refused:pages"),
    "jpeg-2000-scans.jpg": (lambda: _jpeg_with_scans(2000), "refused:scans"),
    # plain formats that must keep working
    "ok.webp": (lambda: _encode(_noise(seed=7), "WEBP", lossless=True), "ok"),
    "ok.tif": (lambda: _good("TIFF", 7), "ok"),
    "ok.bmp": (lambda: _good("BMP", 8), "ok"),
    "ok-progressive.jpg": (lambda: _encode(_noise(seed=8), "JPEG", progressive=True), "ok"),
    "ok-16bit.png": (lambda: _encode(Image.fromarray(np.arange(40 * 32, dtype=np.uint16).reshape(32, 40) * 50), "PNG"),
                     "ok"),
}


@functools.cache
def crafted(name: str) -> bytes:
    return CRAFTED[name][0]()


def small_image(seed: int, fmt: str) -> bytes:
    img = _noise(16 + seed % 20, 16 + seed % 13, seed)
    if fmt == "GIF":
        img = img.convert("P")
    return _encode(img, fmt)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut]) if cut is not None else bytes(b)


def hostile_file_bytes():
    valid = st.builds(small_image, st.integers(0, 10**6), st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    return st.one_of(
        st.binary(max_size=3000),
        st.sampled_from(sorted(CRAFTED)).map(crafted),
        valid,
        st.builds(_mutate, valid, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
                  st.one_of(st.none(), st.integers(0, 400))),
        st.builds(lambda a, b: a + b, valid, st.sampled_from([SCRIPT, b"%PDF-1.4", b"PK\x03\x04", b"\0" * 100])),
    )


FILENAMES = ["../../etc/passwd", "..\\..\\x.png", "/etc/shadow", "C:\\Windows\\win.ini", "a\x00b.png", "x" * 1000 + ".png",
             "\u202egnp.exe", "𝔘𝔫𝔦.png", "e\u0301\u0301.png", "<script>alert(1)</script>.png",
             '"><img src=x onerror=alert(1)>.png', "{{7*7}}.png", "'; DROP TABLE case_images; --.png", "..", ".",
             "dir/", "CON", "x.png\r\nX-Injected: 1", "\t.png", "%2e%2e%2fetc%2fpasswd", "image.png"]


def hostile_filename():
    return st.one_of(st.sampled_from(FILENAMES), st.text(chars(False), min_size=1, max_size=40),
                     injection_text().map(lambda s: s + ".png"))


def multipart(fields: dict[str, str] | None = None, files: list[tuple[str, bytes]] = (),
              field: str = "images") -> tuple[bytes, str]:
    """A multipart body as a browser sends it: file names in UTF-8 with '"', CR and LF percent-encoded
    (the HTML standard), any other character (NUL included) as is."""
    out = []
    for k, v in (fields or {}).items():
        out.append(f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
                   + v.encode() + b"\r\n")
    for name, data in files:
        enc = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode("utf-8")
        out.append(f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="'.encode()
                   + enc + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n")
    out.append(f"--{MULTIPART_BOUNDARY}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"


def received(body: bytes, ctype: str, field: str = "images") -> list[tuple[str, bytes]]:
    """The files of a multipart body as the server's parser delivers them. Not always all of them: a
    name ending in a backslash escapes its closing quote (browsers do not escape backslashes), and
    the part then arrives as a plain form field, which the upload views ignore like a missing file."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    req = Request(EnvironBuilder(method="POST", data=body, content_type=ctype).get_environ())
    return [(f.filename, f.read()) for f in req.files.getlist(field) if f.filename]


def usable(data: bytes) -> bool:
    """The oracle: would this file be accepted as an image (size limits aside)?"""
    try:
        load_image(data)
        return True
    except ImageLoadError:
        return False


def case_shas(app, case_id: int) -> set[str]:
    return {r[0] for r in q(app, select(CaseImage.sha256).where(CaseImage.case_id == case_id))}


def before_upload(app, case_id: int | None, files) -> dict:
    """Snapshot plus the oracle's answer: the hashes the upload should add (usable and new to the case)."""
    snap = snapshot(app)
    snap["case_shas"] = case_shas(app, case_id) if case_id else set()
    snap["want"] = {hashlib.sha256(d).hexdigest() for _, d in files if usable(d)} - snap["case_shas"]
    return snap


def check_upload(app, case_id: int, before: dict) -> set[str]:
    """After an upload to ``case_id``: exactly the usable, new images were added, each complete; no file
    of a refused image was stored; no other row changed. Returns the added hashes."""
    added = case_shas(app, case_id) - before["case_shas"]
    assert added == before["want"], f"added {sorted(added)} but the usable new images are {sorted(before['want'])}"
    assert_consistent(app)
    new_files = stored_files(app) - before["files"]
    assert {f.split("/")[2] for f in new_files} <= added, f"files stored for refused images: {sorted(new_files)[:4]}"
    rows = snapshot(app)["rows"]
    for t, n in before["rows"].items():
        grow = len(added) if t in ("case_images", "analyses") else 0
        assert rows[t] == n + grow, f"{t}: {n} -> {rows[t]} (added {len(added)})"
    return added


# ============================================================================ patients (HTML)
PATIENT_FIELDS = {"mrn": 64, "family_name": 100, "given_name": 100, "notes": 5000}
# The documented MRN character set (SECURITY.md, V5), written out here as the oracle's own copy.
VALID_MRN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/-]{0,63}", re.ASCII)


def mrn_text(surrogates: bool = False):
    """Hostile MRNs (nearly all refused) or valid ones with blanks around, so acceptance is exercised."""
    valid = st.tuples(st.sampled_from(["", " ", "\t"]), st.from_regex(VALID_MRN, fullmatch=True),
                      st.sampled_from(["", " "])).map("".join)
    return st.one_of(hostile_text(64, surrogates), valid)


def patient_values(surrogates: bool = False):
    return st.fixed_dictionaries(
        {k: mrn_text(surrogates) if k == "mrn" else hostile_text(n, surrogates) for k, n in PATIENT_FIELDS.items()},
        optional={"sex": st.one_of(st.sampled_from(["female", "male", "other", "unknown"]), hostile_text(16)),
                  "birth_date": st.one_of(st.sampled_from(["1980-02-03", "2999-01-01", "1700-01-01", "0000-00-00",
                                                           "1980-02-30", "'; --"]), hostile_text(10))})


def patient_row(app, pid: int) -> tuple:
    with sessions_of(app)() as s:
        p = s.get(Patient, pid)
        return p.mrn, p.family_name, p.given_name, p.notes, p.sex, p.birth_date


def assert_patient_stored(app, pid: int, v: dict) -> None:
    mrn, family, given, notes, sex, birth = patient_row(app, pid)
    assert (mrn, family, given) == (v["mrn"].strip(), v["family_name"].strip(), v["given_name"].strip())
    assert notes == v["notes"] and sex == (v.get("sex") or "unknown")
    assert (birth.isoformat() if birth else "") == (v.get("birth_date") or "").strip()  # blank: no date


def must_reject_patient(v: dict) -> bool:
    """Inputs the patient form / API must refuse, whatever else is wrong."""
    return (any("\x00" in v.get(k, "") for k in PATIENT_FIELDS)
            or any(len(v.get(k, "")) > n for k, n in PATIENT_FIELDS.items())
            or not VALID_MRN.fullmatch(v["mrn"].strip()) or not v["family_name"].strip())


@fuzz(40)
@given(v=patient_values())
@example(v={"mrn": "MRN-\x00", "family_name": "Nul", "given_name": "", "notes": ""})
@example(v={"mrn": "MRN-XSS-1", "family_name": "<script>alert(1)</script>", "given_name": '"><img src=x onerror=alert(1)>',
            "notes": "</textarea><script>alert(1)</script>{{7*7}}"})
@example(v={"mrn": "x" * 640, "family_name": "é" * 1000, "given_name": "", "notes": "𝔘" * 50000})
def test_new_patient_form(app, client_for, v):
    c = client_for("doc_a")
    before = snapshot(app)
    data = {"sex": "unknown", "birth_date": ""}
    data.update(v)
    r = c.post("/patients/new", data=data)
    no_5xx(r, "POST /patients/new")
    payloads = payloads_in(*v.values())
    if r.status_code == 302:
        assert not must_reject_patient(v), f"accepted invalid patient {v!r}"
        pid = int(r.headers["Location"].rsplit("/", 1)[1])
        assert_patient_stored(app, pid, data)
        with sessions_of(app)() as s:
            assert s.get(PatientAccess, (pid, DOC_A.id)) is not None
        rows = snapshot(app)["rows"]
        assert rows["patients"] == before["rows"]["patients"] + 1
        assert rows["patient_access"] == before["rows"]["patient_access"] + 1
        assert_safe_html(follow(c, r).data, payloads, "patient page")
        for url, args in (("/patients/", {}), ("/patients/", {"q": v["mrn"][:100]}),
                          ("/patients/", {"q": v["family_name"][:100]}), (f"/patients/{pid}/edit", {})):
            page = c.get(url, query_string=args)
            assert page.status_code == 200
            assert_safe_html(page.data, payloads, url)
        assert str(escape(v["family_name"].strip())) in c.get(f"/patients/{pid}/edit").data.decode()
    else:
        assert r.status_code == 200 and b'class="error"' in r.data, r.data[:500]
        assert_unchanged(app, before, "POST /patients/new")
        assert_safe_html(r.data, payloads, "rejected patient form")


@fuzz(30)
@given(v=patient_values())
@example(v={"mrn": "MRN-A-0001", "family_name": "Doe\x00", "given_name": "Jane", "notes": ""})
@example(v={"mrn": "MRN-A-0001", "family_name": '"><script>alert(1)</script>', "given_name": "{{7*7}}", "notes": "a\x00"})
def test_edit_patient_form(app, client_for, v):
    c = client_for("doc_a")
    before = snapshot(app)
    old_row = patient_row(app, PATIENT_A_ID)
    data = {"sex": "unknown", "birth_date": ""}
    data.update(v)
    r = c.post(f"/patients/{PATIENT_A_ID}/edit", data=data)
    no_5xx(r, "POST edit")
    if r.status_code == 302:
        assert not must_reject_patient(v), f"accepted invalid edit {v!r}"
        assert_patient_stored(app, PATIENT_A_ID, data)
    else:
        assert r.status_code == 200 and b'class="error"' in r.data
        assert patient_row(app, PATIENT_A_ID) == old_row, "a rejected edit changed the patient"
    assert snapshot(app) == before  # an edit never adds or removes rows or files
    payloads = payloads_in(*v.values())
    assert_safe_html(r.data, payloads, "edit response")
    for url in (f"/patients/{PATIENT_A_ID}", "/patients/", f"/cases/{CASE_A_ID}", "/cases/", "/"):
        assert_safe_html(c.get(url).data, payloads, url)


# ============================================================================ patients (API)
def json_value(limit: int):
    return st.one_of(hostile_text(limit, surrogates=True), st.none(), st.integers(), st.floats(allow_nan=True),
                     st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def json_patient():
    return st.one_of(
        st.fixed_dictionaries({k: mrn_text(True) if k == "mrn" else hostile_text(n, surrogates=True)
                               for k, n in PATIENT_FIELDS.items()},
                              optional={"sex": st.sampled_from(["female", "male", "other", "unknown", "<b>"]),
                                        "birth_date": st.one_of(st.none(), st.sampled_from(
                                            ["1980-02-03", "2999-01-01", "x", "1980-02-30"]))}),
        st.dictionaries(st.sampled_from(list(PATIENT_FIELDS) + ["sex", "birth_date", "id", "<script>", "\ud800"]),
                        json_value(100), max_size=6),
    )


def raw_json(value) -> bytes:
    """JSON text (lone surrogates become \\udXXX escapes, as any JSON encoder writes them)."""
    return json.dumps(value, ensure_ascii=True).encode()


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@fuzz(50)
@given(body=json_patient(), patch=st.booleans())
@example(body={"mrn": "MRN-\ud800", "family_name": "Surrogate"}, patch=False)
@example(body={"mrn": "MRN-S2", "family_name": "Surrogate", "notes": "\udfff"}, patch=False)
@example(body={"given_name": "\ud83d"}, patch=True)
@example(body={"mrn": "MRN-\x00-NUL", "family_name": "Nul"}, patch=False)
def test_api_patient_create_and_patch(app, tok, body, patch):
    c = app.test_client()
    t = tok("doc_a")
    before = snapshot(app)
    old_row = patient_row(app, PATIENT_A_ID)
    if patch:
        r = c.patch(f"/api/v1/patients/{PATIENT_A_ID}", data=raw_json(body), headers=h(t),
                    content_type="application/json")
    else:
        r = c.post("/api/v1/patients", data=raw_json(body), headers=h(t), content_type="application/json")
    assert_json(r, "API patient")
    assert r.status_code in ((200, 400, 409, 422) if patch else (201, 400, 409, 422)), r.status_code
    if r.status_code in (200, 201):
        assert not any(isinstance(v, str) and UNSTORABLE.search(v) for v in body.values())
        assert "mrn" not in body or VALID_MRN.fullmatch(body["mrn"].strip()), f"accepted the MRN {body['mrn']!r}"
        out = r.get_json()
        mrn, family, given, notes, _sex, _birth = patient_row(app, out["id"])
        for k, stored in (("mrn", mrn), ("family_name", family), ("given_name", given)):
            if k in body:
                assert stored == body[k].strip() == out[k]
        if "notes" in body:
            assert notes == body["notes"] == out["notes"]
        assert snapshot(app)["rows"]["patients"] == before["rows"]["patients"] + (0 if patch else 1)
    else:
        assert set(r.get_json()) == {"error"}
        assert_unchanged(app, before, "API patient")
        assert patient_row(app, PATIENT_A_ID) == old_row
    assert_json(c.get("/api/v1/patients", headers=h(t)), "API list")


@fuzz(20)
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=50).map(str.encode)),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                              "multipart/form-data", "application/json; charset=utf-16"]),
       idempotent=st.booleans())
@example(body=b"[" * 100_000, ctype="application/json", idempotent=False)  # was a RecursionError (500)
@example(body=b'{"a":' * 50_000, ctype="application/json", idempotent=True)
def test_api_garbage_bodies(app, tok, body, ctype, idempotent):
    c = app.test_client()
    t = tok("doc_a")
    headers = dict(h(t), **({"Idempotency-Key": hashlib.sha256(body).hexdigest()} if idempotent else {}))
    for method, url in (("POST", "/api/v1/patients"), ("PATCH", f"/api/v1/patients/{PATIENT_A_ID}"),
                        ("POST", f"/api/v1/patients/{PATIENT_A_ID}/cases"), ("POST", f"/api/v1/cases/{CASE_A_ID}/sign"),
                        ("POST", f"/api/v1/cases/{CASE_A_ID}/images")):
        before = snapshot(app)
        r = c.open(url, method=method, data=body, headers=headers, content_type=ctype)
        assert_json(r, f"{method} {url}")
        assert 400 <= r.status_code < 500 or r.status_code in (200, 201), r.status_code
        if r.status_code >= 400:
            assert_unchanged(app, before, f"{method} {url}")


# ============================================================================ cases: creation and uploads
def files_strategy(min_size: int = 0):
    return st.lists(st.tuples(hostile_filename(), hostile_file_bytes()), min_size=min_size, max_size=3)


@fuzz(30)
@given(note=hostile_text(5000), analyzer=st.one_of(st.just("smear-all"), hostile_text(64)), files=files_strategy(),
       submission=st.one_of(st.none(), hostile_text(64)))
@example(note="<script>alert(1)</script>", analyzer="smear-all",
         files=[('"><img src=x onerror=alert(1)>.png', PNG_SIG + b"junk" * 10), ("../../etc/passwd", _good("PNG", 5))],
         submission=None)
@example(note="ok", analyzer="smear-all", files=[("\u202egnp.exe", _good("PNG", 6)), ("a\x00b.png", b"")],
         submission=None)
@example(note="a\x00b", analyzer="smear-all", files=[("x.png", _good("PNG", 7))], submission=None)
def test_new_case_form_with_uploads(app, client_for, note, analyzer, files, submission):
    c = client_for("doc_a")  # a fresh session: the submission id is new to it
    fields = {"analyzer_id": analyzer, "clinical_note": note}
    if submission is not None:
        fields["submission_id"] = submission
    body, ctype = multipart(fields, files)
    before = before_upload(app, None, received(body, ctype))
    r = c.post(f"/patients/{PATIENT_A_ID}/cases/new", data=body, content_type=ctype)
    no_5xx(r, "new case")
    payloads = payloads_in(note, analyzer, *[n for n, _ in files])
    if r.status_code == 302:
        assert analyzer == "smear-all" and len(note) <= 5000 and "\x00" not in note
        cid = int(r.headers["Location"].rsplit("/", 1)[1])
        assert before["rows"]["cases"] + 1 == snapshot(app)["rows"]["cases"]
        with sessions_of(app)() as s:
            case = s.get(Case, cid)
            assert case.clinical_note == note and case.patient_id == PATIENT_A_ID
            assert case.status == ("analysing" if case.images else "open")
        before["rows"]["cases"] += 1
        check_upload(app, cid, before)
        page = follow(c, r)
        assert page.status_code == 200
        assert_safe_html(page.data, payloads, "case page after creation")
        msgs = flashes(page.data)
        refused = len([1 for _, d in received(body, ctype) if not usable(d)])
        assert len([m for m in msgs if ": not added. " in m]) == refused, msgs
        for url in ("/cases/", f"/patients/{PATIENT_A_ID}", "/"):
            assert_safe_html(c.get(url).data, payloads, url)
    else:
        # every refusal is listed at the top (a field's, or "no image could be added" with each file's reason)
        assert r.status_code == 200 and b'class="error-summary"' in r.data, r.data[:400]
        assert_unchanged(app, before, "rejected new case")
        assert_safe_html(r.data, payloads, "rejected new case form")


@fuzz(40)
@given(files=files_strategy(min_size=1), how=st.sampled_from(["html", "html-json", "api", "api-idempotent"]))
@example(files=[("x.tif", _tiff_with_pages(2000))], how="api")
@example(files=[("<script>alert(1)</script>.png", _good("PNG", 3)), ("zero.png", b"")], how="html")
@example(files=[("..\\..\\evil.png", _good("PNG", 4))], how="html-json")
@example(files=[("name-ending-in-a-backslash\\", _good("PNG", 9))], how="api")
def test_case_image_upload(app, client_for, tok, files, how):
    token = tok("doc_a")
    web = client_for("doc_a")
    body, ctype = multipart(files=files)
    before = before_upload(app, CASE_A_ID, received(body, ctype))
    payloads = payloads_in(*[n for n, _ in files])
    if how.startswith("api"):
        c = app.test_client()
        headers = h(token)
        if how == "api-idempotent":
            headers["Idempotency-Key"] = uuid.uuid4().hex
        r = c.post(f"/api/v1/cases/{CASE_A_ID}/images", data=body, content_type=ctype, headers=headers)
        assert_json(r, "API upload")
        assert r.status_code in (200, 422), r.status_code
        out = r.get_json()
        added = check_upload(app, CASE_A_ID, before)
        if "error" in out:  # no file part arrived
            assert out["error"]["code"] == "no_files" and not received(body, ctype) and not added
        else:
            assert len(out["added"]) == len(added)
            assert all(set(e) == {"file", "message"} for e in out["errors"])
        if how == "api-idempotent":  # a retry replays the answer and stores nothing more
            snap = snapshot(app)
            again = c.post(f"/api/v1/cases/{CASE_A_ID}/images", data=body, content_type=ctype, headers=headers)
            assert_json(again, "API upload retry")
            assert again.status_code == r.status_code and again.get_json() == out
            assert snapshot(app) == snap
        return
    headers = {"Accept": "application/json"} if how == "html-json" else {}
    r = web.post(f"/cases/{CASE_A_ID}/images", data=body, content_type=ctype, headers=headers)
    no_5xx(r, "HTML upload")
    added = check_upload(app, CASE_A_ID, before)
    if how == "html-json":
        assert_json(r, "upload (json)")
        out = r.get_json()
        assert r.status_code == (200 if out["added"] or out["duplicates"] else 422)
        assert len(out["added"]) == len(added)
    else:
        assert r.status_code == 302
        page = follow(web, r)
        msgs = flashes(page.data)
        assert any("queued for analysis" in m for m in msgs) == bool(added), msgs
        assert_safe_html(page.data, payloads, "case page with flashes")
        assert_safe_html(web.get("/cases/").data, payloads, "history")


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_hostile_file(app, client_for, tok, name):
    """Each crafted hostile file, uploaded through the API: refused with a clear message and nothing
    stored, or accepted complete; never slow; an accepted polyglot is only ever served re-encoded."""
    data, expect = crafted(name), CRAFTED[name][1]
    t = tok("doc_a")
    web = client_for("doc_a")
    before = before_upload(app, CASE_A_ID, [(name, data)])
    body, ctype = multipart(files=[(name, data)])
    t0 = time.perf_counter()
    r = app.test_client().post(f"/api/v1/cases/{CASE_A_ID}/images", data=body, content_type=ctype, headers=h(t))
    elapsed = time.perf_counter() - t0
    assert_json(r, name)
    assert elapsed < 15, f"{name}: took {elapsed:.1f} s"
    out = r.get_json()
    added = check_upload(app, CASE_A_ID, before)
    if expect == "ok":
        assert r.status_code == 200 and len(out["added"]) == 1 and len(added) == 1, out
        iid = out["added"][0]
        for kind in ("original", "thumb"):
            img = web.get(f"/cases/{CASE_A_ID}/images/{iid}/{kind}.png")
            assert img.status_code == 200 and img.mimetype == "image/png"
            assert img.headers["X-Content-Type-Options"] == "nosniff"
            assert img.data.startswith(PNG_SIG) and b"<script" not in img.data and b"alert(1)" not in img.data
            Image.open(io.BytesIO(img.data)).verify()
        assert_safe_html(web.get(f"/cases/{CASE_A_ID}").data, [name], "case page")
    else:
        words = expect.split(":", 1)[1]
        assert r.status_code == 422 and out["added"] == [] and len(out["errors"]) == 1, out
        assert words in out["errors"][0]["message"], out["errors"][0]["message"]
        assert not added


# ============================================================================ API case creation
@fuzz(30)
@given(body=st.one_of(st.fixed_dictionaries({"analyzer_id": st.one_of(st.just("smear-all"), hostile_text(64, True))},
                                            optional={"clinical_note": hostile_text(5000, True)}),
                      st.dictionaries(st.sampled_from(["analyzer_id", "clinical_note", "patient_id", "\ud800"]),
                                      json_value(64), max_size=3)))
@example(body={"analyzer_id": "smear-all", "clinical_note": "\ud800"})
@example(body={"analyzer_id": "smear-all", "clinical_note": "a\x00b"})
def test_api_case_create(app, tok, body):
    c = app.test_client()
    t = tok("doc_a")
    before = snapshot(app)
    r = c.post(f"/api/v1/patients/{PATIENT_A_ID}/cases", data=raw_json(body), headers=h(t),
               content_type="application/json")
    assert_json(r, "API case create")
    assert r.status_code in (201, 400, 422), r.status_code
    if r.status_code == 201:
        note = body.get("clinical_note", "")
        assert not UNSTORABLE.search(note)
        assert one(app, select(Case.clinical_note).where(Case.id == r.get_json()["id"])) == note
        assert snapshot(app)["rows"]["cases"] == before["rows"]["cases"] + 1
    else:
        assert_unchanged(app, before, "API case create")


# ============================================================================ sign-off
SIGN_FIELDS = {"override_reason": 5000, "uncertainty_note": 5000, "comment": 10000, "amendment_reason": 5000}
DIAGNOSES = ["Benign", "Early", "Pre", "Pro", "Nondiagnostic"]  # the smear-all labels


def sign_values(surrogates: bool):
    return st.fixed_dictionaries(
        {"final_diagnosis": st.one_of(st.sampled_from(DIAGNOSES), hostile_text(64, surrogates))},
        optional={k: st.one_of(st.just("reviewed"), hostile_text(n, surrogates)) for k, n in SIGN_FIELDS.items()})


def check_sign(app, before: dict, accepted: bool, v: dict) -> None:
    if not accepted:
        assert_unchanged(app, before, "rejected sign")
        return
    assert v["final_diagnosis"] in DIAGNOSES
    assert not any(UNSTORABLE.search(v.get(k, "")) for k in SIGN_FIELDS), f"accepted unstorable text {v!r}"
    assert v.get("uncertainty_note", "").strip(), "signed an out-of-domain case without a note"
    assert v.get("override_reason", "").strip(), "signed a case the AI gave no diagnosis without a reason"
    assert snapshot(app)["rows"]["reviews"] == before["rows"]["reviews"] + 1
    with sessions_of(app)() as s:
        case = s.get(Case, CASE_A_ID)
        r = case.current_review
        assert case.status == "signed" and case.final_diagnosis == v["final_diagnosis"] == r.final_diagnosis
        for k in SIGN_FIELDS:
            assert getattr(r, k) == v.get(k, "").strip()
        assert r.version == 1 or r.amendment_reason


@fuzz(30)
@given(v=sign_values(False), confirm=st.sampled_from(["y", "", "n", "<script>"]))
@example(v={"final_diagnosis": "Pre", "uncertainty_note": "<script>alert(1)</script>",
            "override_reason": '"><img src=x onerror=alert(1)>', "comment": "{{7*7}}"}, confirm="y")
@example(v={"final_diagnosis": "Pre", "uncertainty_note": "a\x00b"}, confirm="y")
def test_sign_form(app, client_for, v, confirm):
    c = client_for("doc_a")
    before = snapshot(app)
    r = c.post(f"/cases/{CASE_A_ID}/sign", data=dict(v, confirm=confirm))
    no_5xx(r, "sign form")
    assert r.status_code in (302, 400), r.status_code
    check_sign(app, before, r.status_code == 302, v)
    payloads = payloads_in(*v.values())
    assert_safe_html(follow(c, r).data, payloads, "case page after sign")
    assert_safe_html(c.get("/cases/").data, payloads, "history")


@fuzz(30)
@given(v=st.one_of(sign_values(True), st.dictionaries(st.sampled_from(["final_diagnosis", "comment", "x"]),
                                                     json_value(64), max_size=3)))
@example(v={"final_diagnosis": "Pre", "uncertainty_note": "\ud800 note"})
@example(v={"final_diagnosis": "Pre", "uncertainty_note": "ok", "comment": "\udc00"})
def test_api_sign(app, tok, v):
    c = app.test_client()
    t = tok("doc_a")
    before = snapshot(app)
    r = c.post(f"/api/v1/cases/{CASE_A_ID}/sign", data=raw_json(v), headers=h(t), content_type="application/json")
    assert_json(r, "API sign")
    assert r.status_code in (200, 400, 422), r.status_code
    check_sign(app, before, r.status_code == 200, v)


# ============================================================================ accounts
@fuzz(30)
@given(name=hostile_text(200), email=st.one_of(injection_text().map(lambda s: s + "@x.test"), hostile_text(255),
                                               st.text(chars(), max_size=10).map(lambda s: f"u{s}@clinic.test")),
       password=st.one_of(st.just("valid-pass-123!"), hostile_text(256)),
       role=st.one_of(st.sampled_from(["doctor", "admin"]), hostile_text(20)))
@example(name="<script>alert(1)</script>", email="xss@clinic.test", password="valid-pass-123!", role="doctor")
@example(name="Nul\x00Name", email="nul@clinic.test", password="valid-pass-123!", role="doctor")
@example(name="Nul", email="n\x00ul@clinic.test", password="valid-pass-123!", role="doctor")
def test_admin_user_forms(app, client_for, name, email, password, role):
    c = client_for("admin")
    before = snapshot(app)
    r = c.post("/admin/users", data={"name": name, "email": email, "password": password, "role": role})
    no_5xx(r, "create user")
    payloads = payloads_in(name, email, role)
    if r.status_code == 302:
        assert "\x00" not in name + email and role in ("doctor", "admin") and len(name) <= 200
        assert snapshot(app)["rows"]["users"] == before["rows"]["users"] + 1
        with sessions_of(app)() as s:
            u = s.scalar(select(User).order_by(User.id.desc()).limit(1))
            assert (u.name, u.email, u.role) == (name.strip(), email.strip().lower(), role)
            uid = u.id
        assert login(app.test_client(), email, password).status_code == 302  # the account works
        assert_safe_html(follow(c, r).data, payloads, "users page")
        assert_safe_html(c.get(f"/admin/users/{uid}").data, payloads, "user page")
    else:
        assert r.status_code == 200 and b'class="error"' in r.data
        assert_unchanged(app, before, "rejected user")
        assert_safe_html(r.data, payloads, "rejected user form")
    # the edit forms of an existing account, with the same hostile values
    snap = snapshot(app)
    r1 = c.post(f"/admin/users/{SPARE.id}", data={"role-role": role})
    r2 = c.post(f"/admin/users/{SPARE.id}", data={"pw-password": name if password == "valid-pass-123!" else password})
    for resp in (r1, r2):
        no_5xx(resp, "user edit form")
        assert_safe_html(follow(c, resp).data, payloads, "user edit")
    assert snapshot(app)["rows"] == snap["rows"]
    assert one(app, select(User.role).where(User.id == SPARE.id)) in ("doctor", "admin")


def test_login_form(make_app):
    app = make_app(login_max_failures=10**9)  # no lockout: every example is a fresh failure

    @fuzz(40)
    @given(email=st.one_of(hostile_text(255), st.sampled_from([DOC_A.email + "\x00", DOC_A.email.upper() + " "])),
           password=hostile_text(256), nxt=st.one_of(st.none(), hostile_text(100)))
    @example(email="doctor.a@clinic.test\x00", password="x", nxt=None)
    @example(email="<script>alert(1)</script>", password="' OR '1'='1", nxt='"><script>alert(1)</script>')
    def run(email, password, nxt):
        c = app.test_client()
        before = snapshot(app)
        url = "/login" + ("?" + urllib.parse.urlencode({"next": nxt}) if nxt is not None else "")
        r = c.post(url, data={"email": email, "password": password})
        no_5xx(r, "login")
        assert r.status_code in (200, 401), r.status_code  # no hostile input signs anybody in
        assert snapshot(app)["rows"] == before["rows"]
        assert_safe_html(r.data, payloads_in(email, nxt), "login page")
        assert c.get("/patients/").status_code == 302

    run()


def test_password_change_form(make_app):
    app = make_app(login_max_failures=10**9)
    state = {"password": DOC_A.password}

    @fuzz(25)
    @given(current=st.one_of(st.just("CURRENT"), hostile_text(256)),
           new=st.one_of(hostile_text(256), st.just("new-valid-pass-1!")), confirm_same=st.booleans())
    @example(current="CURRENT", new="<script>alert(1)</script>𝔘\x00ok-1", confirm_same=True)
    def run(current, new, confirm_same):
        c = app.test_client()
        assert login(c, DOC_A.email, state["password"]).status_code == 302
        before = snapshot(app)
        cur = state["password"] if current == "CURRENT" else current
        r = c.post("/account/password", data={"current": cur, "password": new,
                                              "confirm": new if confirm_same else new + "x"})
        no_5xx(r, "password change")
        assert snapshot(app)["rows"] == before["rows"]
        if r.status_code == 302:
            assert cur == state["password"] and confirm_same and 10 <= len(new) <= 256
            state["password"] = new
        else:
            assert r.status_code == 200 and b'class="error"' in r.data
            assert_safe_html(r.data, payloads_in(current, new), "password form")
        assert login(app.test_client(), DOC_A.email, state["password"]).status_code == 302

    run()


@fuzz(30)
@given(name=hostile_text(100), days=st.one_of(st.none(), st.sampled_from(["1", "3650", "0", "-1", "3651", "1e3",
                                                                           "99999999999999999999", "' OR 1=1"]),
                                              hostile_text(20)))
@example(name="<script>alert(1)</script>", days="30")
@example(name="tok\x00en", days="")
def test_token_form(app, client_for, name, days):
    c = client_for("doc_a")
    before = snapshot(app)
    r = c.post("/account/tokens", data={"name": name, "expires_in_days": days or ""})
    no_5xx(r, "token form")
    assert r.status_code == 200
    created = snapshot(app)["rows"]["api_tokens"] == before["rows"]["api_tokens"] + 1
    if created:
        m = re.search(rb"osk_[0-9a-f]{8}_[A-Za-z0-9_\-]+", r.data)
        assert m, "a new token must be shown once"
        assert_json(app.test_client().get("/api/v1/patients", headers=h(m.group().decode())), "new token")
        stored = one(app, select(ApiToken.name).order_by(ApiToken.id.desc()).limit(1))
        assert stored == (name.replace("\x00", "").strip()[:100] or "API token")
    else:
        assert_unchanged(app, before, "rejected token")
        assert b'class="error"' in r.data
    payloads = payloads_in(name, days)
    assert_safe_html(r.data, payloads, "tokens page")
    assert_safe_html(c.get("/account/tokens").data, payloads, "tokens page")


# ============================================================================ search and query strings
def qs_value():
    """A raw query-string value: hostile text percent-encoded, or raw bytes (invalid UTF-8 included)."""
    return st.one_of(hostile_text(100).map(lambda s: urllib.parse.quote(s, safe="")),
                     st.binary(max_size=30).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
                     st.sampled_from(["%ED%A0%80", "%00", "%ff", "%", "%%", "1", "0", "-1", "99999999999999999999",
                                      "2024-01-01", "9999-12-31", "signed", "javascript", "POST"]))


QS_KEYS = ["q", "page", "status", "diagnosis", "doctor", "from", "to", "per_page", "endpoint", "_method",
           "_external", "_scheme", "_anchor", "next"]


def test_search_query_strings(make_app):
    """Hostile query strings on every list page (one patient / case per page, so the pager links are
    rendered) and on the API lists."""
    app = make_app(page_size=1)
    clients = {}
    for who, acc in (("admin", ADMIN), ("doc_a", DOC_A)):
        clients[who] = app.test_client()
        assert login(clients[who], acc).status_code == 302
    for i in range(2):
        clients["doc_a"].post(f"/patients/{PATIENT_A_ID}/cases/new", data={"analyzer_id": "smear-all"})
        clients["doc_a"].post("/patients/new", data={"mrn": f"MRN-S-{i}", "family_name": f"Search{i}", "sex": "unknown"})
    from oncoscope.store import tokens as token_store

    with sessions_of(app)() as s:
        _t, token = token_store.create(s, s.get(User, DOC_A.id), "search")
        s.commit()

    @fuzz(60)
    @given(params=st.lists(st.tuples(st.sampled_from(QS_KEYS), qs_value()), max_size=5))
    @example(params=[("endpoint", "x")])  # was a TypeError in the history pager (500)
    @example(params=[("_method", "POST")])  # was a BuildError in the history pager (500)
    @example(params=[("_external", "1"), ("_scheme", "javascript")])
    @example(params=[("to", "9999-12-31")])  # was an OverflowError computing the day after (500, web and API)
    @example(params=[("q", "%3Cscript%3Ealert(1)%3C%2Fscript%3E"), ("status", "%22%3E%3Cscript%3E")])
    def run(params):
        qs = "&".join(f"{k}={v}" for k, v in params)
        decoded = [urllib.parse.unquote(v, errors="replace") for _, v in params]
        before = snapshot(app)
        for who, c in clients.items():
            for path in ("/patients/", "/cases/", "/"):
                r = c.get(f"{path}?{qs}")
                no_5xx(r, f"{who} GET {path}?{qs}")
                assert r.status_code == 200, (path, r.status_code)
                assert_safe_html(r.data, decoded, f"{path}?{qs}")
                for href in re.findall(rb'href="([^"]*)"', r.data):
                    assert href.startswith((b"/", b"#")), f"{path}?{qs}: link {href[:80]!r}"
        for path in ("/api/v1/patients", "/api/v1/cases", f"/api/v1/patients/{PATIENT_A_ID}/cases"):
            r = app.test_client().get(f"{path}?{qs}", headers=h(token))
            assert_json(r, f"GET {path}?{qs}")
            assert r.status_code in (200, 400), r.status_code
        assert snapshot(app) == before

    run()


@fuzz(30)
@given(path=st.one_of(st.sampled_from(INJECTIONS), st.text(chars(), max_size=30)).map(
    lambda s: urllib.parse.quote(s, safe="")))
@example(path="%3Cscript%3Ealert(1)%3C%2Fscript%3E")
def test_error_pages_do_not_reflect(app, client_for, tok, path):
    c = client_for("doc_a")
    t = tok("doc_a")
    decoded = urllib.parse.unquote(path, errors="replace")
    for url in (f"/x-{path}", f"/patients/x-{path}", f"/cases/x-{path}", f"/cases/{CASE_A_ID}/images/1/x-{path}.png",
                f"/analyzers/x-{path}", f"/cases/{CASE_A_ID}/export/x-{path}", f"/patients/{PATIENT_B_ID}/x-{path}"):
        r = c.get(url)
        no_5xx(r, url)
        assert r.status_code in (404, 405), (url, r.status_code)
        assert r.mimetype == "text/html"
        assert_safe_html(r.data, [decoded], url)
    for url in (f"/api/v1/x-{path}", f"/api/v1/patients/x-{path}", f"/api/v1/cases/x-{path}"):
        r = app.test_client().get(url, headers=h(t))
        assert_json(r, url)
        assert r.status_code in (404, 405)
    r = c.post(f"/patients/{PATIENT_B_ID}/edit", data={"mrn": decoded, "family_name": decoded})  # not hers
    assert r.status_code == 404
    assert_safe_html(r.data, [decoded], "404 on a POST")


# ============================================================================ stored XSS sweep
def _dicom(patient_id: str, patient_name: str) -> bytes:
    from tests.web.test_patients import dicom_file

    return dicom_file(patient_id, patient_name, birth="19800203")


TEMPLATE_PAYLOADS = [p for p in INJECTIONS if "{{" in p or "{%" in p]


def test_stored_injection_payloads_are_escaped_everywhere(app, client_for, tok):
    """Every injection payload stored in every text field, then every page that shows them: no payload
    unescaped, the escaped form present, templates not evaluated; the exports still build."""
    doc, admin = client_for("doc_a"), client_for("admin")
    t = tok("doc_a")
    pages: list[tuple[object, str, str]] = []  # (client, url, payload expected there escaped)
    for i, p in enumerate(INJECTIONS):
        fields = {"mrn": f"X{i}-{p}"[:64], "family_name": p, "given_name": p, "notes": p, "sex": "unknown"}
        if not VALID_MRN.fullmatch(fields["mrn"]):  # refused with the form escaped, then a plain MRN
            r = doc.post("/patients/new", data=fields)
            assert r.status_code == 200 and b'class="error"' in r.data, (p, r.data[:300])
            assert_safe_html(r.data, [p], f"refused MRN {p!r}")
            fields["mrn"] = f"X{i}"
        r = doc.post("/patients/new", data=fields)
        assert r.status_code == 302, (p, r.data[:300])
        pid = int(r.headers["Location"].rsplit("/", 1)[1])
        body, ctype = multipart({"analyzer_id": "smear-all", "clinical_note": p},
                                [(f"{p}.png", _good("PNG", 100 + i)), (f"bad-{p}.png", b"<html>" + p.encode())])
        r = doc.post(f"/patients/{pid}/cases/new", data=body, content_type=ctype)
        assert r.status_code == 302
        cid = int(r.headers["Location"].rsplit("/", 1)[1])
        page = follow(doc, r)  # the flash messages name the refused file
        assert_safe_html(page.data, [p], f"case page with flashes for {p!r}")
        assert str(escape(clean_filename(f"bad-{p}.png"))) + ": not added." in page.data.decode()
        pages += [(doc, f"/patients/{pid}", p), (doc, f"/patients/{pid}/edit", p), (doc, f"/cases/{cid}", p),
                  (admin, f"/admin/users/{5 + i}", p)]
        r = admin.post("/admin/users", data={"name": p, "email": f"xss{i}@clinic.test", "password": "valid-pass-123!",
                                             "role": "doctor"})
        assert r.status_code == 302 and one(app, select(User.name).where(User.id == 5 + i)) == p
        assert doc.post("/account/tokens", data={"name": p}).status_code == 200
    # sign case 1 (out of domain: a note is needed) with payloads in every text, then amend it
    for p in INJECTIONS[:4]:
        r = doc.post(f"/cases/{CASE_A_ID}/sign", data={"final_diagnosis": "Pre", "uncertainty_note": p,
                                                       "override_reason": p, "comment": p, "amendment_reason": p,
                                                       "confirm": "y"})
        assert r.status_code == 302, r.data[:300]
    pages += [(doc, f"/cases/{CASE_A_ID}", INJECTIONS[3]), (doc, "/patients/", INJECTIONS[0]),
              (doc, "/cases/", INJECTIONS[0]), (doc, "/", ""), (admin, "/", ""), (admin, "/admin/users", INJECTIONS[1]),
              (doc, "/account/tokens", INJECTIONS[2]), (admin, "/patients/?q=%3Cscript%3E", INJECTIONS[0]),
              (doc, "/cases/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E", "<script>alert(1)</script>")]
    for c, url, p in pages:
        r = c.get(url)
        assert r.status_code == 200, url
        assert_safe_html(r.data, INJECTIONS, url)
        assert str(escape(p)) in r.data.decode(), (url, p)
    for c, url, p in pages:
        if p in TEMPLATE_PAYLOADS:  # shown literally: not evaluated by any template engine
            assert p in c.get(url).data.decode(), (url, p)
    # the exports of the signed case carry the payloads and still build; the JSON API answers JSON
    for url, mime in ((f"/cases/{CASE_A_ID}/report.pdf", "application/pdf"),
                      (f"/cases/{CASE_A_ID}/export/fhir", "application/fhir+json"),
                      (f"/cases/{CASE_A_ID}/export/hl7", "application/hl7-v2"),
                      (f"/cases/{CASE_A_ID}/export/dicom-sr", "application/dicom")):
        r = doc.get(url)
        assert r.status_code == 200 and r.mimetype == mime, (url, r.status_code)
    for url in ("/api/v1/patients?per_page=100", f"/api/v1/cases/{CASE_A_ID}", "/api/v1/cases?per_page=100"):
        r = app.test_client().get(url, headers=h(t))
        assert_json(r, url)
        assert r.status_code == 200
    assert_consistent(app)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_dicom_with_hostile_patient_module(app, client_for):
    """A DICOM whose patient name / ID carry payloads: the pre-filled patient form and the upload's
    mismatch message escape them, and neither stores anything. Identifiers with NUL are stored without it."""
    import pydicom

    c = client_for("doc_a")
    evil_id, evil_name = '"><img src=x onerror=alert(1)>', "<script>alert(1)</script>^Eve"
    data = _dicom(evil_id, evil_name)
    before = snapshot(app)
    body, ctype = multipart(files=[("scan.dcm", data)], field="dicom")
    r = c.post("/patients/from-dicom", data=body, content_type=ctype)
    assert r.status_code == 200
    assert_safe_html(r.data, [evil_id, "<script>alert(1)</script>"], "pre-filled form")
    assert str(escape(evil_id)) in r.data.decode()
    for junk in (b"", b"\0" * 128 + b"DICM" + b"\xff" * 50, _good("PNG", 1), SCRIPT):
        body, ctype = multipart(files=[("x.dcm", junk)], field="dicom")
        r = c.post("/patients/from-dicom", data=body, content_type=ctype)
        no_5xx(r, "from-dicom junk")
        assert_safe_html(follow(c, r).data, [], "from-dicom junk")
    assert_unchanged(app, before, "from-dicom")
    # the same file uploaded to patient 1's case: refused (another patient's ID), the message escaped
    snap = before_upload(app, CASE_A_ID, [])
    body, ctype = multipart(files=[("scan.dcm", data)])
    r = c.post(f"/cases/{CASE_A_ID}/images", data=body, content_type=ctype)
    assert r.status_code == 302
    page = follow(c, r)
    assert any("belongs to patient ID" in m for m in flashes(page.data)), flashes(page.data)
    assert_safe_html(page.data, [evil_id], "mismatch flash")
    check_upload(app, CASE_A_ID, snap)
    # a DICOM of the right patient whose identifiers hold NUL: accepted, stored without it
    ds = pydicom.dcmread(io.BytesIO(_dicom("MRN-A-0001", "Doe^Jane")))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values, as it should
        ds.StudyInstanceUID, ds.Modality = "1.2.3\x004", "O\x00T"
        ds.save_as(buf)
    files = [("nul.dcm", buf.getvalue())]
    snap = before_upload(app, CASE_A_ID, files)
    body, ctype = multipart(files=files)
    assert c.post(f"/cases/{CASE_A_ID}/images", data=body, content_type=ctype).status_code == 302
    (sha,) = check_upload(app, CASE_A_ID, snap)
    row = q(app, select(CaseImage.dicom_study_uid, CaseImage.modality).where(CaseImage.sha256 == sha))
    assert row == [("1.2.34", "OT")]
