"""Crash-safe file writes: a file is either its old self or complete, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__: list[str] = []


@contextlib.contextmanager
def atomic_file(path: Path, *, prefix: str = ".tmp-", suffix: str = "") -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only once it is written and synced.

    The temporary lives beside ``path`` (same file system, so the rename is
    atomic) and is named ``prefix...suffix`` so callers can recognise and sweep
    one left by a kill. On an exception it is removed and ``path`` is untouched.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, *, prefix: str = ".tmp-", suffix: str = "") -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, prefix=prefix, suffix=suffix) as f:
        f.write(data)
