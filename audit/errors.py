"""Exception hierarchy shared by the CLI and the dashboard.

Everything a user can cause derives from :class:`UserError`: the CLI prints
its message as one line and exits with code 2; the app shows it in an error
box. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "DatasetError",
    "LabelFileError",
    "ModelError",
    "ReviewError",
    "StoreError",
    "UserError",
    "WeightsUnavailableError",
]


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
