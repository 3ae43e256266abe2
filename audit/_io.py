"""Crash-safe file writes: a file is either its old self or complete, never half-written.

Every write of ``audit``'s own files goes through :func:`atomic_file`, so it is
also the one place where the machine refusing a write (a full disk, a read-only
file system, no permission) becomes one clear :class:`~audit.errors.DiskError`,
and where tests inject such faults (:data:`_fault`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from audit.errors import DISK_ERRNOS, disk_error

__all__: list[str] = []

# Fault-injection hook for tests: called with the target path before each write is
# committed (after the data went to the temporary); raise an OSError to simulate one.
_fault: Callable[[Path], None] | None = None


@contextlib.contextmanager
def atomic_file(path: Path, *, prefix: str = ".tmp-", suffix: str = "") -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only once it is written and synced.

    The temporary lives beside ``path`` (same file system, so the rename is
    atomic) and is named ``prefix...suffix`` so callers can recognise and sweep
    one left by a kill. On an exception it is removed and ``path`` is untouched.

    Raises
    ------
    DiskError
        The machine refused the write (no space, read-only, no permission).
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if _fault is not None:
                _fault(path)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, f"writing {path}") from e
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, *, prefix: str = ".tmp-", suffix: str = "") -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, prefix=prefix, suffix=suffix) as f:
        f.write(data)
