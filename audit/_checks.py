"""Array checks shared by the public functional APIs (:mod:`audit.evaluate`, :mod:`audit.flag`).

Each raises ``ValueError`` saying what was expected and what was seen; they run
once, at the boundary of a public function.
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []


def as_mask(valid: object, n: int, name: str = "valid") -> np.ndarray:
    """``valid`` as a bool array of shape ``(n,)``."""
    v = np.asarray(valid)
    if v.shape != (n,):
        raise ValueError(f"{name} has shape {v.shape}, expected (N,)=({n},)")
    if v.dtype != bool:
        raise ValueError(f"{name} has dtype {v.dtype}, expected bool")
    return v


def as_labels(labels: object, n: int, max_class: int, *, shape_hint: str = "", range_hint: str = "") -> np.ndarray:
    """Labels as int64 ``(n,)``, each ``-1`` (excluded) or a class index in ``[0, max_class]``."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels has shape {lab.shape}, expected (N,)=({n},){shape_hint}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels has dtype {lab.dtype}, expected integers")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and (lab.min() < -1 or lab.max() > max_class):
        raise ValueError(
            f"labels lie in [{lab.min()}, {lab.max()}], expected -1 (excluded) or a class index in "
            f"[0, {max_class}]{range_hint}"
        )
    return lab
