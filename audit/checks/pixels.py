"""Image checks on the pixel statistics of the decode pass: CleanVision's image properties and exact duplicates.

Every check here needs only ``pixels`` (:func:`audit.scoring.load_pixel_stats`,
measured inside the single decode pass by :mod:`audit.scoring.pixels`), so it
runs even with no model at all.

* One check per CleanVision image property: ``dark``, ``light``, ``blurry``,
  ``low_information``, ``odd_aspect_ratio``, ``odd_size``, ``grayscale``. Each
  scores and flags exactly as CleanVision's ``ImagePropertyIssueManager`` does:
  its property classes' ``get_scores`` and ``mark_issue``, with its default
  parameters (``get_default_params``) unless the user sets others. CleanVision's
  scores already follow the contract (in [0, 1], low = more of the issue).
  One check per property, not one ``image_properties`` check: a check gives one
  score per image, and seven properties need seven; and the dashboard filters by
  check, so "dark images" is a plain filter on the check name, with no per-image
  info to parse.
* ``exact_duplicate``: images whose decoded pixels are identical (md5 of the
  pixels, CleanVision's exact-duplicate hash), reported as groups; copies with
  different labels are their own finding; with a reference set (``--reference
  TRAIN_DIR``), images identical to a reference image (leakage), without
  scoring the reference set's labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from audit.checks._base import Check, CheckInputs, CheckResult
from audit.errors import CheckError

__all__ = [
    "PIXEL_CHECKS",
    "BlurryCheck",
    "DarkCheck",
    "ExactDuplicateCheck",
    "GrayscaleCheck",
    "LightCheck",
    "LowInformationCheck",
    "OddAspectRatioCheck",
    "OddSizeCheck",
    "PropertyCheck",
]

_MAX_LISTED = 50  # partners named per image: a blank frame repeated 5,000 times must not write 25M ids


def _assessed(inputs: CheckInputs) -> np.ndarray:
    """(N,) bool: images with pixel statistics (decoded) that the run counts as valid."""
    px = inputs.pixels
    assert px is not None
    ok = np.asarray(px["ok"], dtype=bool).copy()
    if inputs.valid is not None:
        ok &= np.asarray(inputs.valid, dtype=bool)
    return ok


def _manager() -> Any:
    # Imported here, not at module level: CleanVision loads matplotlib (1.5 s), which `audit checks` must not pay.
    from cleanvision.issue_managers.image_property_issue_manager import ImagePropertyIssueManager

    return ImagePropertyIssueManager()


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float, np.number)) and not isinstance(x, bool) else None


class PropertyCheck(Check):
    """One CleanVision image property as a check; subclasses name the property (``name`` = CleanVision's issue type)."""

    needs: ClassVar[frozenset[str]] = frozenset({"pixels"})
    default: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        mgr = _manager()
        defaults = dict(mgr.params[self.name])
        # CleanVision's own knobs for this property; every property but grayscale is flagged below a threshold.
        allowed = set(defaults) | ({"threshold"} if self.name != "grayscale" else set())
        for k, v in params.items():
            if k not in allowed:
                takes = ", ".join(sorted(allowed)) or "no options"
                raise CheckError(f"--check-option {self.name}: no option {k!r}; it takes {takes}")
            f = _number(v)
            if f is None or not math.isfinite(f):
                raise CheckError(f"--check-option {self.name}.{k}: must be a finite number, got {v!r}")
        super().__init__(**params)
        # CleanVision's get_scores checks that a threshold is a float: 1 is passed on as 1.0.
        self.effective = {**defaults, **{k: float(v) for k, v in params.items()}}

    def _raw(self, px: Mapping[str, np.ndarray], column: str, idx: np.ndarray) -> np.ndarray:
        if column == "color_space":
            # CleanVision reads the file's mode ("L" is grayscale); the decode pass measured the pixels instead.
            return np.where(np.asarray(px["grayscale"], dtype=bool)[idx], "L", "RGB")
        return np.asarray(px[column], dtype=np.float64)[idx]

    def run(self, inputs: CheckInputs) -> CheckResult:
        import pandas as pd
        from cleanvision.utils.utils import get_is_issue_colname, get_score_colname

        px = inputs.pixels
        assert px is not None
        n = inputs.n
        prop = _manager().image_properties[self.name]  # a fresh instance: SizeProperty keeps state between calls
        idx = np.flatnonzero(_assessed(inputs))
        score = np.full(n, np.nan)
        is_issue = np.zeros(n, dtype=bool)
        info: list[dict[str, Any] | None] = [None] * n
        threshold = self.effective.get("threshold")
        if len(idx):
            cols = {c: self._raw(px, c, idx) for c in prop.score_columns}
            raw = pd.DataFrame(cols, index=idx)
            scores = prop.get_scores(raw_scores=raw, issue_type=self.name, **self.effective)
            flags = prop.mark_issue(scores=scores, issue_type=self.name, threshold=threshold)
            # CleanVision's formulas keep scores in [0, 1] up to float rounding (brightness of white: 1 + 2e-16).
            score[idx] = np.clip(scores[get_score_colname(self.name)].to_numpy(dtype=np.float64), 0.0, 1.0)
            is_issue[idx] = flags[get_is_issue_colname(self.name)].to_numpy(dtype=bool)
            threshold = getattr(prop, "threshold", threshold)  # odd_size sets its own from the spread of sizes
            # The raw values behind each flag, for the reviewer (column-wise: 50,000 rows take milliseconds).
            pos = np.flatnonzero(is_issue[idx])
            values = {c: v[pos].tolist() for c, v in cols.items()}
            for j, i in enumerate(idx[pos].tolist()):
                info[i] = {c: values[c][j] for c in values}
        summary: dict[str, Any] = {
            "issues": int(is_issue.sum()),
            "assessed": len(idx),
            "threshold": _number(threshold),
        }
        stat = prop.name  # the property CleanVision describes in its info["statistics"]
        if len(idx) and stat in px and np.asarray(px[stat]).dtype.kind == "f":
            desc = pd.Series(np.asarray(px[stat], dtype=np.float64)[idx]).describe()
            summary["statistics"] = {"property": stat, **{k: _jsonable(v) for k, v in desc.items()}}
        return CheckResult(
            check=self.name,
            score=score,
            is_issue=is_issue,
            info=info,
            params={k: _jsonable(v) for k, v in self.effective.items()},
            summary=summary,
        )


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return str(v)


class DarkCheck(PropertyCheck):
    name = "dark"
    description = "nearly black images (CleanVision: 99th percentile of brightness)"


class LightCheck(PropertyCheck):
    name = "light"
    description = "washed-out, nearly white images (CleanVision: 5th percentile of brightness)"


class BlurryCheck(PropertyCheck):
    name = "blurry"
    description = "blurred images (CleanVision: edge strength and grey-level spread)"


class LowInformationCheck(PropertyCheck):
    name = "low_information"
    description = "images with little content (CleanVision: entropy of the histogram)"


class OddAspectRatioCheck(PropertyCheck):
    name = "odd_aspect_ratio"
    description = "images unusually wide or tall (CleanVision: min(w/h, h/w))"


class OddSizeCheck(PropertyCheck):
    name = "odd_size"
    description = "images far smaller or larger than the rest (CleanVision: sqrt(area) outside the IQR fence)"


class GrayscaleCheck(PropertyCheck):
    name = "grayscale"
    description = "grayscale images in the set (CleanVision; here: all three channels equal)"


class ExactDuplicateCheck(Check):
    """Images with identical decoded pixels, as groups; with a reference set, images identical to one of its images.

    Score (CleanVision's duplicate score): ``1 / k`` for an image with ``k - 1``
    identical images (in the set and in the reference set together), 1 for an
    image with none; NaN for an image without pixel statistics. Suggestion: the
    lowest-index partner in the set (-1: none, or only reference partners).
    Info, for each duplicated image: ``group`` (one number per distinct image,
    in order of first appearance), ``partners`` (indices in the set, at most
    50, ``n_partners`` counts them all), ``labels_differ`` (its group's given
    labels disagree); with a reference set, ``reference`` (its partners'
    ids, or indices when the reference has no ids), ``n_reference``, and where
    the reference has labels, ``reference_labels`` (theirs, aligned with
    ``reference``, in this run's label space; -1: a class the set lacks) and
    ``reference_labels_differ``.
    """

    name = "exact_duplicate"
    needs: ClassVar[frozenset[str]] = frozenset({"pixels"})
    default: ClassVar[bool] = True
    suggests: ClassVar[str | None] = "image"  # a partner's image index (the contract's Check.suggests)
    description = "identical images (md5 of the decoded pixels), within the set and against --reference"

    def __init__(self, **params: Any) -> None:
        if params:
            raise CheckError(f"--check-option {self.name}: it takes no options, got {', '.join(sorted(params))}")
        super().__init__()

    def run(self, inputs: CheckInputs) -> CheckResult:
        px = inputs.pixels
        assert px is not None
        n = inputs.n
        ok = _assessed(inputs)
        md5 = np.asarray(px["md5"])
        labels = None if inputs.labels is None else np.asarray(inputs.labels, dtype=np.int64)
        ref, ref_note = _reference_hashes(inputs.reference)
        idx = np.flatnonzero(ok)
        keys, inverse, counts = np.unique(md5[idx], return_inverse=True, return_counts=True)
        in_ref = np.array([k in ref.members for k in keys.tolist()], dtype=bool)
        dup_key = (counts > 1) | in_ref
        score = np.full(n, np.nan)
        score[idx] = 1.0
        is_issue = np.zeros(n, dtype=bool)
        suggestion = np.full(n, -1, dtype=np.int64)
        info: list[dict[str, Any] | None] = [None] * n
        # Members of each duplicated key, in index order; groups numbered by their first member.
        members: dict[int, list[int]] = {}
        for i, key in zip(idx.tolist(), inverse.tolist(), strict=True):
            if dup_key[key]:
                members.setdefault(key, []).append(i)
        groups = sorted(members.values(), key=lambda m: m[0])
        found = {"groups": 0, "images": 0}
        differ = {"groups": 0, "images": 0}
        leak = {"images": 0, "reference_images": 0, "different_labels": 0}
        for g, group in enumerate(groups):
            refs = ref.members.get(str(md5[group[0]]), [])
            given = set() if labels is None else {int(x) for x in labels[group] if x >= 0}
            labels_differ = len(given) > 1
            if len(group) > 1:
                found["groups"] += 1
                found["images"] += len(group)
                if labels_differ:
                    differ["groups"] += 1
                    differ["images"] += len(group)
            if refs:
                leak["images"] += len(group)
                leak["reference_images"] += len(refs)
            for i in group:
                partners = [j for j in group if j != i]
                score[i] = 1.0 / (len(group) + len(refs))
                is_issue[i] = True
                suggestion[i] = partners[0] if partners else -1
                row: dict[str, Any] = {
                    "group": g,
                    "partners": partners[:_MAX_LISTED],
                    "n_partners": len(partners),
                    "labels_differ": labels_differ,
                }
                if refs:
                    row["reference"] = [ref.name(j) for j in refs[:_MAX_LISTED]]
                    row["n_reference"] = len(refs)
                    if ref.labels is not None:
                        # Their labels, aligned with "reference", in this run's classes (-1: a class the set lacks).
                        row["reference_labels"] = [int(ref.labels[j]) for j in refs[:_MAX_LISTED]]
                    if ref.labels is not None and labels is not None and labels[i] >= 0:
                        theirs = {int(ref.labels[j]) for j in refs if ref.labels[j] >= 0}
                        row["reference_labels_differ"] = bool(theirs - {int(labels[i])})
                        leak["different_labels"] += int(row["reference_labels_differ"])
                info[i] = row
        summary: dict[str, Any] = {
            **found,
            "issues": int(is_issue.sum()),
            "assessed": int(ok.sum()),
            # Its own finding: the same picture given two labels is a label error whatever any model says.
            "different_labels": differ if labels is not None else None,
        }
        if inputs.reference is not None:
            summary["reference"] = leak if ref_note is None else {"note": ref_note}
        return CheckResult(
            check=self.name,
            score=score,
            is_issue=is_issue,
            suggestion=suggestion,
            info=info,
            params={"hash": "md5 of the decoded pixels, shape included"},
            summary=summary,
        )


class _RefHashes:
    """A reference set's md5 -> its image indices, with ids and labels for naming and comparing partners."""

    def __init__(
        self,
        members: dict[str, list[int]] | None = None,
        ids: Sequence[str] | None = None,
        labels: np.ndarray | None = None,
    ):
        self.members = members or {}
        self.ids = ids
        self.labels = labels

    def name(self, j: int) -> str | int:
        return self.ids[j] if self.ids is not None and j < len(self.ids) else j


def _reference_hashes(reference: Mapping[str, Any] | None) -> tuple[_RefHashes, str | None]:
    """The reference set's hashes (``reference["pixels"]`` as load_pixel_stats gives them), or why there are none."""
    if reference is None:
        return _RefHashes(), None
    rpx = reference.get("pixels")
    if rpx is None or "md5" not in rpx:
        return _RefHashes(), "the reference set has no pixel statistics: leakage not checked"
    md5 = np.asarray(rpx["md5"])
    ok = np.asarray(rpx.get("ok", np.ones(len(md5), dtype=bool)), dtype=bool)
    members: dict[str, list[int]] = {}
    for j in np.flatnonzero(ok).tolist():
        members.setdefault(str(md5[j]), []).append(j)
    ids = reference.get("image_ids")
    labels = reference.get("labels")
    ids_t = tuple(ids) if ids is not None else None
    return _RefHashes(members, ids_t, None if labels is None else np.asarray(labels)), None


# Every check of this module, in the order the default registry (audit.checks) registers and runs them.
PIXEL_CHECKS: tuple[type[Check], ...] = (
    ExactDuplicateCheck,
    DarkCheck,
    LightCheck,
    BlurryCheck,
    LowInformationCheck,
    OddAspectRatioCheck,
    OddSizeCheck,
    GrayscaleCheck,
)
