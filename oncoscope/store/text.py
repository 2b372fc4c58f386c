"""Text that every supported database can store.

Two kinds of character pass the web forms and the JSON API but not the database: NUL (PostgreSQL
refuses it in text columns) and lone UTF-16 surrogates such as ``"\\ud800"`` (valid in JSON, but they
cannot be encoded as UTF-8 at all, so even SQLite fails). Stored fields refuse them with a message
for the person who typed them; search text and file names (metadata) just drop them.
"""

from __future__ import annotations

import re
import unicodedata

_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "contains characters that cannot be stored (NUL or an invalid Unicode surrogate)."


def unstorable(value) -> bool:
    """Whether ``value`` (a string, or anything else: not checked) holds a character no database takes."""
    return isinstance(value, str) and _UNSTORABLE.search(value) is not None


def storable(value: str) -> str:
    """``value`` without the characters no database takes (for search text)."""
    return _UNSTORABLE.sub("", value or "")


def clean_filename(name: str | None, limit: int = 255) -> str:
    """An uploaded file's name as metadata: the last path component (``/`` or ``\\``), without
    control characters (NUL, line breaks), bidirectional controls (a right-to-left override, U+202E,
    before ``gnp.exe`` makes it display as ``exe.png``) or surrogates, cut to ``limit`` characters;
    ``"image"`` when nothing usable is left."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch not in _BIDI_CONTROLS and unicodedata.category(ch) not in ("Cc", "Cs"))
    name = name.strip()[:limit].strip()
    return name if name not in ("", ".", "..") else "image"
