"""Checks as plug-ins: label, feature-space and image checks, one score per image each (see ``_base``).

:func:`default_checks` is the registry ``audit run --checks`` and ``audit checks`` read;
:func:`run_checks` runs a selection of them on what a run has (:class:`CheckInputs`).
"""

from __future__ import annotations

import functools

# The contract first: check modules may import it from this package while it loads.
from audit.checks._base import INPUTS, Check, CheckInputs, CheckRegistry, CheckResult
from audit.checks._runner import check_name, default_names, make_checks, resolve_checks, run_checks, skip_note

# One import and one class per line, so that adding a check is a one-line change here.
from audit.checks.duplicates import NearDuplicateCheck
from audit.checks.knn import KnnLabelCheck, LabelKnnCheck
from audit.checks.label import LabelCheck
from audit.checks.outlier import OutlierCheck
from audit.checks.pixels import PIXEL_CHECKS

__all__ = [
    "INPUTS",
    "Check",
    "CheckInputs",
    "CheckRegistry",
    "CheckResult",
    "check_name",
    "default_checks",
    "default_names",
    "list_checks",
    "make_checks",
    "resolve_checks",
    "run_checks",
    "skip_note",
]

# Registered (and run) in this order; one class per line. The image checks are listed once, in their module.
_CHECKS: tuple[type[Check], ...] = (
    LabelCheck,
    KnnLabelCheck,
    LabelKnnCheck,
    OutlierCheck,
    NearDuplicateCheck,
    *PIXEL_CHECKS,
)


@functools.cache
def default_checks() -> CheckRegistry:
    """The registry of every shipped check, built once (treat it as read-only; make your own to add checks)."""
    reg = CheckRegistry()
    for cls in _CHECKS:
        reg.register(cls)
    return reg


def list_checks(pattern: str = "*", *, registry: CheckRegistry | None = None) -> list[type[Check]]:
    """Registered check classes whose name matches fnmatch ``pattern``, by name."""
    reg = registry or default_checks()
    return [reg.get(n) for n in reg.names(pattern)]
