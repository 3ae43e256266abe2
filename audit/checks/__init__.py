"""Checks as plug-ins: label, feature-space and image checks, one score per image each (see ``_base``)."""

from audit.checks._base import INPUTS, Check, CheckInputs, CheckRegistry, CheckResult

__all__ = ["INPUTS", "Check", "CheckInputs", "CheckRegistry", "CheckResult"]
