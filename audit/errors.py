"""Exception hierarchy shared by the CLI and the dashboard.

Everything a user can cause derives from :class:`UserError`: the CLI prints
its message as one line and exits with code 2; the app shows it in an error
box. Anything else is a bug and keeps its traceback.

The machine can also stand in the way: a full disk, a read-only file system,
a folder without write permission. Those are :class:`DiskError` too (made by
:func:`disk_error` from the ``OSError``), since the user fixes them.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "DISK_ERRNOS",
    "AuditError",
    "CheckError",
    "ClusterError",
    "DatasetError",
    "DiskError",
    "LabelFileError",
    "ModelError",
    "OptionError",
    "ReviewError",
    "StoreError",
    "UserError",
    "WeightsUnavailableError",
    "disk_error",
    "is_disk_error",
]

# errno values that say "this machine will not let me write here", each with its fix.
_DISK_FIXES = {
    errno.ENOSPC: "free some disk space or choose a folder on another disk",
    errno.EDQUOT: "free some of your disk quota or choose a folder on another disk",
    errno.EFBIG: "the file system limits file size; choose a folder on another disk",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "check the folder's permissions or choose another folder",
    errno.EPERM: "check the folder's permissions or choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; name a file inside it",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.ELOOP: "the path has a symbolic-link loop; choose another path",
}
DISK_ERRNOS = frozenset(_DISK_FIXES)
# Only where something is being created: a file system (/proc) that will not make the name.
_DISK_FIXES[errno.ENOENT] = "the file system will not create it there; choose another folder"
# How DuckDB spells them inside its own error messages (it does not carry errno).
_DUCKDB_REASONS = {os.strerror(e): e for e in _DISK_FIXES}


class AuditError(Exception):
    """Base class of every error raised on purpose by ``audit``."""


class UserError(AuditError):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = 2


class DatasetError(UserError):
    """The dataset folder or its layout cannot be used."""


class LabelFileError(DatasetError):
    """A label file (CSV or ReaL JSON) is malformed or disagrees with the images."""


class ModelError(UserError):
    """A model name, checkpoint or prediction file cannot be used."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached locally nor downloadable."""


class StoreError(UserError):
    """The DuckDB workspace is missing, locked, or of an unknown schema version."""


class ReviewError(StoreError):
    """A review decision cannot be applied: unknown action, wrong labels, or nothing left to undo."""


class OptionError(UserError):
    """A command-line option or API argument is out of range or names something that is not there."""


class CheckError(OptionError):
    """A check name (``--checks``) or check option (``--check-option``) is unknown or out of range."""


class ClusterError(UserError):
    """The scale-out engine cannot run: Ray is not installed, the cluster cannot be reached, or it cannot hold the run.

    Raised before any workspace file is written (:mod:`audit.scoring.ray_engine`); the message names the fix
    (install the extra, start the cluster, put the images where every node sees them, fewer actors).
    """


class DiskError(UserError):
    """A file cannot be written: no space left, a read-only file system, no permission."""


def is_disk_error(e: BaseException) -> bool:
    """True for an ``OSError`` whose errno is one of :data:`DISK_ERRNOS`, or a DuckDB error naming one."""
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    return _duckdb_errno(e) is not None


def _duckdb_errno(e: BaseException) -> int | None:
    if type(e).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
        return None
    text = str(e)
    return next((code for reason, code in _DUCKDB_REASONS.items() if reason in text), None)


def disk_error(e: BaseException, doing: str) -> DiskError:
    """One line for a write the machine refused: what was being done, the OS's reason, the fix.

    Parameters
    ----------
    e : OSError or duckdb.Error
        Where it is an ``OSError``, its ``filename`` names the file.
    doing : str
        What was being written, e.g. ``"writing workspace reports/audit.duckdb"``.
    """
    code = e.errno if isinstance(e, OSError) else _duckdb_errno(e)
    reason = os.strerror(code) if code is not None else str(e)
    where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
    fix = _DISK_FIXES.get(code, "check the disk and the path") if code is not None else "check the disk and the path"
    return DiskError(f"{doing} failed: {reason}{where}; {fix}")
