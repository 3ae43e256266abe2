"""The ``label`` check: today's flagging (:func:`audit.flag.find_label_issues`) as one plug-in.

Its score is the calibrated ensemble's label quality (low = suspicious), its
flag is ``is_label_issue``, its suggestion the label a reviewer should probably
pick; the issue kinds (wrong label, multi-label, no fit, model disagreement)
stay inside it and travel in each image's ``info``, with the suggestion's
confidence, the rank among flagged images and every kind's score, so the
workspace's ``issues`` table holds everything the wide ``label_issues`` table
holds (:func:`label_issues_frame` rebuilds it from a result, and the schema
migration from version 1 writes the same ``info`` from ``label_issues``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from audit import flag
from audit.checks._base import Check, CheckInputs, CheckResult
from audit.errors import CheckError

__all__ = ["LabelCheck", "label_issues_frame"]

# The options a user may set (--check-option label.NAME=VALUE), each as find_label_issues takes it.
_OPTIONS = ("method", "temperature", "frac_flagged", "weights")


class LabelCheck(Check):
    """Label errors from an ensemble of out-of-sample probabilities (see :mod:`audit.flag`).

    Parameters
    ----------
    method, temperature, frac_flagged, weights
        As for :func:`audit.flag.find_label_issues`; ``weights`` "equal" (the
        default, the uniform mean), "fit" or "softmax" (weights fitted on the
        given labels). Equal stays the default because it measured best: on the
        1,300 ReaL-checked images the likelihood fit gives SqueezeNet weight 0
        (it agrees least with the given labels) and loses the diversity that
        finds label errors (``reports/flag_quality.md``).
    """

    name = "label"
    needs = frozenset({"labels", "probs"})
    default = True
    suggests = "label"
    description = (
        "label errors: cleanlab label quality of the calibrated model ensemble; kinds wrong_label, multi_label, "
        "no_fit, model_disagreement; suggests a label"
    )

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(_OPTIONS))
        if unknown:
            raise CheckError(
                f"--check-option label.{unknown[0]}: the label check has no option {unknown[0]!r}; "
                f"its options are {', '.join(_OPTIONS)}"
            )
        try:
            # flag_params runs find_label_issues' own checks of every setting, before any image is read.
            flag.flag_params(**params)
        except ValueError as e:
            raise CheckError(f"--check-option label: {e}") from None
        super().__init__(**params)

    def run(self, inputs: CheckInputs) -> CheckResult:
        df = flag.find_label_issues(list(inputs.probs or ()), inputs.labels, valid=inputs.valid, **self.params)
        fitted = dict(df.attrs["flag_params"])
        kinds = [k["name"] for k in fitted["kinds"]]
        settings = flag.flag_params(**self.params)
        summary_keys = [k for k in fitted if k not in settings]
        flagged = df["is_label_issue"].to_numpy(dtype=bool)
        summary: dict[str, Any] = {k: fitted[k] for k in summary_keys}
        summary["models"] = list(inputs.model_names)
        summary["kinds"] = {k: int((df["issue_kind"].to_numpy()[flagged] == k).sum()) for k in kinds}
        return CheckResult(
            check=self.name,
            score=df["label_quality"].to_numpy(dtype=np.float64),
            is_issue=flagged,
            suggestion=df["suggested_label"].to_numpy(dtype=np.int64),
            info=_info(df, kinds),
            params=settings,
            summary=summary,
        )


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _info(df: pd.DataFrame, kinds: list[str]) -> list[dict[str, Any]]:
    """Per image: the kind, the suggestion's confidence, the rank and every kind's score (None: not assessed)."""
    cols = [f"{k}_score" for k in kinds]
    scores = df[cols].to_numpy(dtype=np.float64)
    conf = df["suggested_confidence"].to_numpy(dtype=np.float64)
    rank = df["rank"]
    return [
        {
            "issue_kind": kind,
            "suggested_confidence": _finite(c),
            "rank": None if pd.isna(r) else int(r),
            "scores": {name: _finite(v) for name, v in zip(cols, row, strict=True)},
        }
        for kind, c, r, row in zip(
            df["issue_kind"].tolist(), conf.tolist(), rank.tolist(), scores.tolist(), strict=True
        )
    ]


def label_issues_frame(result: CheckResult, run_id: str) -> pd.DataFrame:
    """The workspace's ``label_issues`` rows (the label check's detail table) from a label check's result.

    Column for column what ``audit run`` wrote before checks were plug-ins; the
    per-kind scores are the ``scores`` JSON, NaN where an image was not assessed.
    """
    from audit.store import to_json

    info: list[Mapping[str, Any]] = [dict(d or {}) for d in (result.info or [None] * len(result.score))]

    def nan(v: Any) -> float:
        return math.nan if v is None else float(v)

    rank = pd.array([d.get("rank") for d in info], dtype="Int32")
    return pd.DataFrame(
        {
            "image_index": np.arange(len(result.score), dtype=np.int32),
            "label_quality": np.asarray(result.score, dtype=float),
            "is_label_issue": np.asarray(result.is_issue, dtype=bool),
            "suggested_label": (
                np.asarray(result.suggestion, dtype=np.int32)
                if result.suggestion is not None
                else np.full(len(result.score), -1, dtype=np.int32)
            ),
            "suggested_confidence": np.array([nan(d.get("suggested_confidence")) for d in info], dtype=float),
            "issue_kind": [str(d.get("issue_kind") or "") for d in info],
            "rank": rank,
            "scores": [to_json({k: nan(v) for k, v in (d.get("scores") or {}).items()}) for d in info],
            "run_id": run_id,
        }
    )
