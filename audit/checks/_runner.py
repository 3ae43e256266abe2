"""Pick checks by name, validate their options, run them in order (Datalab's issue finder rule).

Names and options are checked at the boundary (:func:`make_checks`), before a
run writes anything; a check whose inputs the run lacks is skipped with a
one-line note naming what was missing (:func:`skip_note`), never an error.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from audit.checks import _memo
from audit.checks._base import Check, CheckInputs, CheckRegistry, CheckResult
from audit.errors import CheckError

__all__ = ["check_name", "default_names", "make_checks", "resolve_checks", "run_checks", "skip_note"]

# Why a run can lack an input, and what gives it one: the second half of a skip note.
_WHY_MISSING = {
    "labels": "the dataset gives no labels",
    "probs": "no model predicts the dataset's classes",
    "logits": "no scored model's logits are stored",
    "features": "no model recorded features (score a zoo model, without --no-features)",
    "pixels": "pixel statistics were not gathered in the decode pass",
    "reference": "no reference set was given (--reference TRAIN_DIR)",
}


def _registry(registry: CheckRegistry | None) -> CheckRegistry:
    if registry is not None:
        return registry
    from audit.checks import default_checks

    return default_checks()


def default_names(registry: CheckRegistry | None = None) -> tuple[str, ...]:
    """The checks ``audit run`` runs when ``--checks`` is not given: those with ``default`` True, by name."""
    return tuple(c.name for c in _registry(registry) if c.default)


def check_name(name: str, registry: CheckRegistry | None = None) -> str:
    """``name`` when it names a registered check; else :class:`CheckError` listing the known checks."""
    reg = _registry(registry)
    if name not in reg:
        raise CheckError(f"no check named {name!r}; known checks: {', '.join(reg.names())} (see 'audit checks')")
    return name


def resolve_checks(names: str | Sequence[str] | None, registry: CheckRegistry | None = None) -> tuple[str, ...]:
    """The registered names a selection means, in the order given, each once.

    Parameters
    ----------
    names : str, sequence of str or None
        Comma-separated text (``--checks label,knn_label``) or a sequence; each item is a
        name or an fnmatch pattern (``"*duplicate"``). None: :func:`default_names`.

    Raises
    ------
    CheckError
        An item that names no registered check, or an empty selection; the message lists the known checks.
    """
    reg = _registry(registry)
    if names is None:
        return default_names(reg)
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else [str(s).strip() for s in names]
    items = [s for s in items if s]
    known = ", ".join(reg.names())
    if not items:
        raise CheckError(f"--checks is empty; name at least one check, from: {known} (see 'audit checks')")
    out: list[str] = []
    for item in items:
        hits = reg.names(item) if any(ch in item for ch in "*?[") else [item] if item in reg else []
        if not hits:
            raise CheckError(f"--checks: no check named {item!r}; known checks: {known} (see 'audit checks')")
        out += [h for h in hits if h not in out]
    return tuple(out)


def make_checks(
    names: str | Sequence[str] | None,
    *,
    registry: CheckRegistry | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Check]:
    """One configured :class:`Check` per selected name, its options checked by its own ``__init__``.

    Parameters
    ----------
    params : mapping of check name to its options, optional
        ``{"label": {"weights": "fit"}}``; options for a check not selected are refused too,
        since the user meant to change something that will not run.

    Raises
    ------
    CheckError
        Unknown names (:func:`resolve_checks`), options for a check not selected, options a check refuses.
    """
    reg = _registry(registry)
    selected = resolve_checks(names, reg)
    params = dict(params or {})
    stray = sorted(set(params) - set(selected))
    if stray:
        name = stray[0]
        why = "is not selected by --checks" if name in reg else "is not a check"
        raise CheckError(
            f"--check-option {name}.*: {name!r} {why}; selected: {', '.join(selected)} (see 'audit checks')"
        )
    out = []
    for name in selected:
        try:
            out.append(reg.get(name)(**dict(params.get(name) or {})))
        except CheckError:
            raise
        except (TypeError, ValueError) as e:
            # A check's own refusal of an option, as one line naming the check.
            raise CheckError(f"--check-option {name}: {e}") from None
    return out


def skip_note(check: Check | type[Check], missing: frozenset[str] | set[str]) -> str:
    """One line: why ``check`` could not run on this run's inputs, and what would give them."""
    names = sorted(missing)
    why = "; ".join(_WHY_MISSING.get(m, m) for m in names)
    # A check content with either input says so: "needs features, pixels" would read as both.
    need = " or ".join(names) if getattr(check, "needs_any", False) else ", ".join(names)
    return f"skipped: needs {need}, which this run lacks ({why})"


def run_checks(
    inputs: CheckInputs,
    names: str | Sequence[str] | Sequence[Check] | None,
    *,
    registry: CheckRegistry | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[CheckResult], dict[str, str]]:
    """Run the selected checks in order on ``inputs``.

    Parameters
    ----------
    names : names (see :func:`resolve_checks`), configured :class:`Check` instances, or None (the defaults)
    registry : CheckRegistry, optional
        Default :func:`audit.checks.default_checks`.
    params : mapping, optional
        Options per check name (see :func:`make_checks`); not with instances.

    Returns
    -------
    results : list of CheckResult
        One per check that ran, in the order selected. Each ``summary`` also holds
        ``n_issues``, ``n_assessed`` (images with a finite score) and ``seconds``.
    notes : dict of str to str
        Check name to the one-line reason it was skipped (:func:`skip_note`), in the order selected.

    Raises
    ------
    CheckError
        Unknown names or options, before any check runs.
    ValueError
        A check returned a result for another number of images, or under another name (a bug in the check).
    """
    if names is not None and not isinstance(names, str) and all(isinstance(c, Check) for c in names) and names:
        if params:
            raise ValueError("params are given to make_checks, not with configured Check instances")
        checks = list(names)  # type: ignore[arg-type]
    else:
        checks = make_checks(names, registry=registry, params=params)  # type: ignore[arg-type]
    results: list[CheckResult] = []
    notes: dict[str, str] = {}
    for check in checks:
        missing = check.missing(inputs)
        if missing:
            notes[check.name] = skip_note(check, missing)
            continue
        t0 = time.perf_counter()
        res = check.run(inputs)
        seconds = time.perf_counter() - t0
        # Left for the checks after it (label_knn reads the label check's scores rather than recomputing them).
        _memo.store(inputs, _memo.result_key(check.name), res)
        if res.check != check.name or len(res.score) != inputs.n:
            raise ValueError(
                f"check {check.name!r} returned a result named {res.check!r} for {len(res.score)} images, "
                f"expected {check.name!r} for N={inputs.n}"
            )
        summary = {
            **dict(res.summary),
            "n_issues": int(np.count_nonzero(res.is_issue)),
            "n_assessed": int(np.count_nonzero(np.isfinite(res.score))),
            "seconds": round(seconds, 3),
        }
        results.append(dataclasses.replace(res, summary=summary))
    return results, notes
