"""Image file store: content-addressed (sha256) under the instance folder, never by user file name."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..imaging.imageio import load_image

THUMB_SIDE = 256


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("invalid content hash")
        return self.root / sha[:2] / sha[2:4] / sha

    def _atomic_write(self, path: Path, data: bytes) -> None:
        try:  # the folder usually exists (overlays, thumbnails): a mkdir that fails costs as much as the write
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def put_original(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._dir(sha) / "original"
        if not path.exists():
            self._atomic_write(path, data)
        return sha

    def put_png(self, sha: str, name: str, arr: np.ndarray) -> Path:
        import io

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG", compress_level=1)  # fast; these are working images
        path = self._dir(sha) / f"{name}.png"
        self._atomic_write(path, buf.getvalue())
        return path

    def put_derived(self, sha: str, filename: str, data: bytes) -> Path:
        """A file derived from an image, under its own name and extension (a gallery JPEG)."""
        if "/" in filename or filename.startswith(".") or filename == "original":
            raise ValueError("invalid derived file name")
        path = self._dir(sha) / filename
        self._atomic_write(path, data)
        return path

    def derived(self, sha: str, filename: str) -> Path:
        return self._dir(sha) / filename

    def put_thumbnail(self, sha: str, rgb: np.ndarray) -> Path:
        img = Image.fromarray(rgb)
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        return self.put_png(sha, "thumb", np.asarray(img))

    def ensure_thumbnail(self, sha: str) -> None:
        """The thumbnail of a stored image, decoded from its original when missing (an image received
        over DICOM is filed from its header, without one). Raises ImageLoadError when it cannot be read."""
        if not self.exists(sha, "thumb") and self.exists(sha):
            self.put_thumbnail(sha, load_image(self.path(sha)).rgb)

    def discard(self, sha: str) -> None:
        """Remove everything stored for one image (an upload whose database commit failed)."""
        import shutil

        shutil.rmtree(self._dir(sha), ignore_errors=True)

    def path(self, sha: str, name: str = "original") -> Path:
        p = self._dir(sha) / (name if name == "original" else f"{name}.png")
        return p

    def exists(self, sha: str, name: str = "original") -> bool:
        return self.path(sha, name).exists()
