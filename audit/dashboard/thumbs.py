"""Thumbnails of dataset images, confined to the run's dataset root.

An image id comes from the workspace (``images.image_id``), which came from a
folder listing or a label file; the dashboard never takes a path from the URL.
Even so, :func:`safe_image_path` applies :func:`audit.datasets.image_path`, the
rule scoring applies: any id that is absolute, climbs with ``..``, or resolves
(through symlinks) to a file outside the dataset root is refused, so nothing
outside the root is ever read or served, and every image scored can be shown.

Thumbnails are JPEG bytes, made with Pillow (draft decoding, so large JPEGs
decode at a fraction of their size) and cached on disk beside the workspace in
``<db>.thumbs/`` keyed by the resolved file, size and its mtime and length; the app
adds an in-memory cache on top.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from audit.datasets import image_path
from audit.errors import DatasetError

__all__ = ["UnsafePath", "safe_image_path", "thumb_dir", "thumbnail"]


class UnsafePath(ValueError):
    """An image id that would leave the dataset root, or names no file under it."""


def safe_image_path(root: str | Path, image_id: str) -> Path:
    """The file ``image_id`` names under ``root``, or :class:`UnsafePath`.

    Refused by :func:`audit.datasets.image_path`: empty ids, NUL bytes,
    absolute paths, ``..`` components, and any id whose resolved path (symlinks
    followed) is not a regular file inside the resolved root.
    """
    try:
        path = image_path(root, image_id)  # the rule scoring applies too: one rule for both
    except DatasetError as e:
        raise UnsafePath(str(e)) from e
    return path


def thumb_dir(db: str | Path) -> Path:
    """The on-disk thumbnail cache beside a workspace."""
    p = Path(db)
    return p.with_name(p.name + ".thumbs")


def thumbnail(root: str | Path, image_id: str, size: int, *, cache: str | Path | None = None) -> bytes:
    """JPEG bytes of the image scaled to fit ``size`` x ``size`` (never enlarged).

    Raises
    ------
    UnsafePath
        The id is refused by :func:`safe_image_path`.
    OSError
        The file cannot be decoded (a bad image).
    """
    size = int(size)
    if not 16 <= size <= 2048:
        raise ValueError(f"thumbnail size {size} is outside 16..2048")
    path = safe_image_path(root, image_id)
    st = path.stat()
    target = None
    if cache is not None:
        # The resolved file, not the id: the same id under two roots (the set and its reference set) is two files.
        key = hashlib.sha256(f"{path}\0{size}\0{st.st_mtime_ns}\0{st.st_size}".encode()).hexdigest()
        target = Path(cache) / str(size) / key[:2] / f"{key}.jpg"
        try:
            return target.read_bytes()
        except OSError:
            pass
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    if target is not None:
        _write_quietly(target, data)
    return data


def _write_quietly(target: Path, data: bytes) -> None:
    """Best effort: a read-only or full disk only costs the cache."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError:
        pass
