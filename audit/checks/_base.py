"""The check contract: every check is a small plug-in with a name, the inputs it needs, and one score per image.

Modelled on cleanlab's Datalab issue managers (``cleanlab/datalab/internal/issue_manager``):
a check declares what it ``needs``; the runner hands it a :class:`CheckInputs` and gets a
:class:`CheckResult` back; a check whose inputs are absent is skipped with a note, as
Datalab's issue finder skips a manager it cannot feed.

One convention for every check (cleanlab's label quality): ``score`` in [0, 1], **low = more
suspicious**, NaN for an image the check did not assess.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "INPUTS",
    "Check",
    "CheckInputs",
    "CheckRegistry",
    "CheckResult",
]

# The inputs a check may declare in ``needs``; CheckInputs.available() says which a run has.
INPUTS = frozenset({"labels", "probs", "logits", "features", "pixels", "reference"})


@dataclass(frozen=True)
class CheckInputs:
    """Everything a run can hand to a check; fields a run lacks are None."""

    n: int  # images in the set, N
    labels: np.ndarray | None = None  # (N,) int64 given (current) labels, -1 = excluded / no label
    n_classes: int = 0  # C, width of the label space
    class_names: tuple[str, ...] = ()  # (C,) display names, index order
    valid: np.ndarray | None = None  # (N,) bool: False for images that could not be decoded or scored
    # Per model, in the run's model order: out-of-sample (N, C) class probabilities (for a custom space
    # the heads' out-of-fold ones), float32 and possibly memory-mapped; NaN rows for invalid images.
    probs: Sequence[np.ndarray] | None = None
    logits: Sequence[np.ndarray] | None = None  # per model (N, C_m) raw logits of the zoo model (ImageNet: C_m=1000)
    # Names of the models behind probs (for a custom space the heads; the zoo models for ImageNet's).
    # logits and features may come from other models (heads have neither): see logit_models / feature_models.
    model_names: tuple[str, ...] = ()
    features: Sequence[np.ndarray] | None = None  # per zoo model (N, D_m) penultimate features, float16 allowed
    # Per-image pixel statistics gathered inside the single decode pass (see audit.checks.pixels):
    # a mapping of column name to (N,) array (e.g. "width", "height", "dhash" ...); None when not gathered.
    pixels: Mapping[str, np.ndarray] | None = None
    # A reference set (``--reference TRAIN_DIR``), never scored for its labels: a mapping with "image_ids"
    # ((M,) ids relative to its root), "features" (per model of feature_models, (M, D_m)), "pixels" (columns as
    # above, (M,) each) and "labels" ((M,) indices into this run's classes, or None where its classes differ).
    reference: Mapping[str, Any] | None = None
    image_ids: tuple[str, ...] = ()  # (N,) ids relative to the dataset root, for suggestions naming partners
    seed: int = 0  # for any randomised step, so a check is deterministic
    logit_models: tuple[str, ...] = ()  # names of the models behind logits, in order (the scored models)
    feature_models: tuple[str, ...] = ()  # names of the models behind features, in order (those that recorded them)

    def available(self) -> frozenset[str]:
        """The names in :data:`INPUTS` this run can feed."""
        have = {
            "labels": self.labels is not None,
            "probs": bool(self.probs),
            "logits": bool(self.logits),
            "features": bool(self.features),
            "pixels": self.pixels is not None,
            "reference": self.reference is not None,
        }
        return frozenset(k for k, v in have.items() if v)


@dataclass(frozen=True)
class CheckResult:
    """What one check found, one row per image (N rows)."""

    check: str  # the check's name
    score: np.ndarray  # (N,) float64 in [0, 1]; low = more suspicious; NaN = not assessed
    is_issue: np.ndarray  # (N,) bool
    # (N,) int64 or None: a suggested label (label checks) or partner image index (duplicate checks); -1 = none.
    suggestion: np.ndarray | None = None
    # Per image JSON-able details, or None: e.g. {"group": 3, "partners": [12, 40]} for duplicates.
    info: Sequence[Mapping[str, Any] | None] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # JSON-able settings the check ran with
    summary: Mapping[str, Any] = field(default_factory=dict)  # JSON-able: counts, thresholds found, notes

    def __post_init__(self) -> None:
        n = len(self.score)
        if self.score.shape != (n,) or self.is_issue.shape != (n,):
            raise ValueError(
                f"check {self.check!r}: score and is_issue must be (N,), got {self.score.shape}, {self.is_issue.shape}"
            )
        s = self.score[np.isfinite(self.score)]
        if s.size and (s.min() < 0 or s.max() > 1):
            raise ValueError(f"check {self.check!r}: scores must lie in [0, 1], got [{s.min()}, {s.max()}]")
        if self.suggestion is not None and self.suggestion.shape != (n,):
            raise ValueError(f"check {self.check!r}: suggestion must be (N,)={n}, got {self.suggestion.shape}")
        if self.info is not None and len(self.info) != n:
            raise ValueError(f"check {self.check!r}: info must have N={n} entries, got {len(self.info)}")


class Check(ABC):
    """A check plug-in. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]  # registry key, snake_case: "label", "near_duplicate", ...
    needs: ClassVar[frozenset[str]]  # subset of INPUTS; all must be available or the check is skipped
    # True: any one of ``needs`` suffices (the check uses what it gets: outlier, near_duplicate).
    needs_any: ClassVar[bool] = False
    default: ClassVar[bool] = True  # on in `audit run` when --checks is not given
    description: ClassVar[str] = ""  # one line for `audit checks`
    # What ``CheckResult.suggestion`` holds, for readers that name it: "label" (a class index), "image"
    # (a partner image index), or None (the check suggests nothing).
    suggests: ClassVar[str | None] = None

    def __init__(self, **params: Any) -> None:
        # Options a user may set; each check validates its own in __init__ and says what it expected.
        self.params = dict(params)

    def missing(self, inputs: CheckInputs) -> frozenset[str]:
        """Inputs this check needs that the run does not have (empty: the check can run).

        With ``needs_any``, empty when any one of ``needs`` is there, else all of them.
        """
        have = inputs.available()
        if self.needs_any and have & self.needs:
            return frozenset()
        return self.needs - have

    @abstractmethod
    def run(self, inputs: CheckInputs) -> CheckResult:
        """Score every image. Called only when :meth:`missing` is empty."""


class CheckRegistry:
    """Checks by name; registering a name twice raises (torchvision's rule for weights)."""

    def __init__(self) -> None:
        self._checks: dict[str, type[Check]] = {}

    def register(self, cls: type[Check]) -> type[Check]:
        """Add a check class (usable as a decorator)."""
        if not getattr(cls, "name", None):
            raise ValueError(f"{cls.__name__} has no name")
        unknown = set(cls.needs) - INPUTS
        if unknown:
            raise ValueError(f"check {cls.name!r} needs unknown inputs {sorted(unknown)}; known: {sorted(INPUTS)}")
        if cls.name in self._checks:
            raise ValueError(f"a check named {cls.name!r} is already registered ({self._checks[cls.name].__name__})")
        self._checks[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Check]:
        try:
            return self._checks[name]
        except KeyError:
            raise KeyError(f"unknown check {name!r}; known: {', '.join(sorted(self._checks))}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching an fnmatch ``pattern``, sorted (timm's list_models rule)."""
        return sorted(n for n in self._checks if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._checks[n] for n in sorted(self._checks))
