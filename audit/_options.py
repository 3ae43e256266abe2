"""Checks of option values, shared by the CLI's argument types and the API boundary (:func:`audit.pipeline.run_audit`).

Each returns the value it accepts (normalised) or raises
:class:`~audit.errors.OptionError` with one line naming the option, what it
takes and what it got. They run before any workspace file is written.
"""

from __future__ import annotations

import math
import os
import re

from audit.errors import OptionError

__all__: list[str] = []


def check_int(name: str, value: object, *, lo: int, hi: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``[lo, hi]``; ``what`` says what ``lo`` means (e.g. "0 loads in this process")."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(text)
            value = int(text)
        except ValueError:
            raise OptionError(f"{name} takes a whole number, got {value!r}") from None
    if value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise OptionError(f"{name} must be {span}{f' ({what})' if what else ''}, got {value}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool: True / False (also 1 / 0, "true" / "false", "yes" / "no", "on" / "off")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{name} takes true or false, got {value!r}")


def check_probability(name: str, value: object) -> float:
    """``value`` as a finite float in ``[0, 1]`` (a threshold on probabilities or sigmoid scores)."""
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name} takes a number between 0 and 1, got {value!r}") from None
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise OptionError(f"{name} must be a number between 0 and 1, got {value!r}")
    return x


def check_positive(name: str, value: object, *, hi: float | None = None) -> float:
    """``value`` as a finite float above 0 (and at most ``hi``): a share of a resource, e.g. 0.5 GPU."""
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name} takes a number above 0, got {value!r}") from None
    if not math.isfinite(x) or x <= 0 or (hi is not None and x > hi):
        span = f"above 0 and at most {hi:g}" if hi is not None else "above 0"
        raise OptionError(f"{name} must be a number {span}, got {value!r}")
    return x


def check_workers(name: str, value: object) -> int:
    """DataLoader worker processes: 0 (load in this process) up to four per CPU."""
    cpus = os.cpu_count() or 1
    return check_int(name, value, lo=0, hi=4 * cpus, what=f"0 loads in this process; this machine has {cpus} CPUs")


def check_device(name: str, value: str | None) -> str | None:
    """A torch device string that this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; None = automatic."""
    if value is None:
        return None
    text = str(value).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if m is None:
        raise OptionError(
            f"{name} {value!r} is not a device; use cpu, cuda, cuda:N or mps (default: cuda when present)"
        )
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return "cpu"
    import torch

    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise OptionError(f"{name} {value}: this machine has no CUDA GPU that torch can use; pass --device cpu")
        if index is not None and int(index) >= n:
            raise OptionError(f"{name} {value}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        return text
    if not torch.backends.mps.is_available():
        raise OptionError(f"{name} {value}: this machine has no Apple GPU (mps) that torch can use; pass --device cpu")
    return text
