"""A per-run memo: results computed once per :class:`~audit.checks.CheckInputs` and shared by checks.

Several checks need the same expensive intermediate (the nearest-neighbour graph feeds
``knn_label``, ``near_duplicate`` and ``outlier``; the label check's scores feed
``label_knn``). Datalab keeps such things in its ``statistics`` (the ``weighted_knn_graph``
one issue manager leaves for the next); here the runner hands every check the same frozen
:class:`CheckInputs`, so the memo is keyed by that object and dies with it (a
``weakref.finalize`` drops the entry), and no result outlives the run that made it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["forget", "memo", "peek", "result_key", "store"]

T = TypeVar("T")

# id(inputs) -> {key: value}. Keyed by id, not by the object: CheckInputs holds arrays, so it
# cannot be hashed; the finalizer removes the entry before the id can be reused.
_MEMO: dict[int, dict[Hashable, Any]] = {}


def _slot(inputs: object) -> dict[Hashable, Any]:
    key = id(inputs)
    slot = _MEMO.get(key)
    if slot is None:
        slot = _MEMO[key] = {}
        weakref.finalize(inputs, _MEMO.pop, key, None)
    return slot


def result_key(name: str) -> tuple[str, str]:
    """The memo key under which the runner leaves check ``name``'s :class:`CheckResult` for later checks."""
    return ("result", name)


def memo(inputs: object, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` once per ``(inputs, key)``; later calls with the same pair return the same object."""
    slot = _slot(inputs)
    if key not in slot:
        slot[key] = compute()
    return slot[key]


def peek(inputs: object, key: Hashable) -> Any:
    """The memoised value for ``(inputs, key)``, or None."""
    return _MEMO.get(id(inputs), {}).get(key)


def store(inputs: object, key: Hashable, value: Any) -> None:
    """Set the memoised value for ``(inputs, key)`` (e.g. a larger neighbour graph replacing a smaller one)."""
    _slot(inputs)[key] = value


def forget(inputs: object) -> None:
    """Drop everything memoised for ``inputs`` (tests; a runner that wants the memory back early)."""
    _MEMO.pop(id(inputs), None)
