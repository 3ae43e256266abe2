"""The label check: find_label_issues as a plug-in, unchanged; and the ensemble weights fitted on the labels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_flag import noisy_set, softmax

from audit.checks import CheckInputs, run_checks
from audit.checks.label import LabelCheck, label_issues_frame
from audit.flag import find_label_issues, flag_params
from audit.store import to_json


def _issue_frame_v1(issues: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """``audit.pipeline._issue_frame`` as it was before checks were plug-ins: what label_issues held."""
    score_cols = [c for c in issues.columns if c.endswith("_score")]
    scores = [
        to_json({c: float(v) for c, v in zip(score_cols, row, strict=True)})
        for row in issues[score_cols].itertuples(index=False)
    ]
    return pd.DataFrame(
        {
            "image_index": issues["index"].astype(np.int32),
            "label_quality": issues["label_quality"].astype(float),
            "is_label_issue": issues["is_label_issue"].astype(bool),
            "suggested_label": issues["suggested_label"].astype(np.int32),
            "suggested_confidence": issues["suggested_confidence"].astype(float),
            "issue_kind": issues["issue_kind"].astype(str),
            "rank": issues["rank"].astype("Int32"),
            "scores": scores,
            "run_id": run_id,
        }
    )


@pytest.fixture(scope="module")
def noisy():
    probs, given, _, flipped = noisy_set(n=600, seed=3)
    given = given.copy()
    given[[5, 50]] = -1  # excluded images: rows with NaN scores
    valid = np.ones(len(given), bool)
    valid[[9, 90]] = False  # unreadable images
    for p in probs:
        p[[9, 90]] = np.nan
    return probs, given, valid, flipped


def _inputs(probs, given, valid) -> CheckInputs:
    return CheckInputs(
        n=len(given), labels=given, n_classes=probs[0].shape[1], valid=valid, probs=probs, model_names=("a", "b", "c")
    )


def test_the_label_check_is_find_label_issues_row_for_row(noisy):
    probs, given, valid, _ = noisy
    (res,), notes = run_checks(_inputs(probs, given, valid), "label")
    df = find_label_issues(probs, given, valid=valid)
    assert not notes and res.check == "label"
    np.testing.assert_array_equal(res.score, df["label_quality"].to_numpy())
    np.testing.assert_array_equal(res.is_issue, df["is_label_issue"].to_numpy())
    np.testing.assert_array_equal(res.suggestion, df["suggested_label"].to_numpy())
    # The label_issues table it writes is the one audit run wrote before, column for column.
    pd.testing.assert_frame_equal(label_issues_frame(res, "r1"), _issue_frame_v1(df, "r1"))
    assert res.info[5]["rank"] is None and res.info[5]["scores"]["no_fit_score"] is None
    flagged = np.flatnonzero(df["is_label_issue"].to_numpy())
    assert {res.info[i]["issue_kind"] for i in flagged} <= {
        "wrong_label",
        "multi_label",
        "no_fit",
        "model_disagreement",
    }
    json.dumps(res.info, allow_nan=False)  # strict JSON: NaN became null
    assert res.summary["n_issues"] == len(flagged) == res.summary["n_flagged"]
    assert res.summary["n_assessed"] == len(given) - 4 and res.summary["models"] == ["a", "b", "c"]
    assert res.summary["kinds"] == {
        k: int((df["issue_kind"].to_numpy()[flagged] == k).sum())
        for k in ("wrong_label", "multi_label", "no_fit", "model_disagreement")
    }
    assert res.params == flag_params()  # the settings; what was fitted is in the summary
    assert len(res.summary["temperatures_used"]) == 3


def test_options_reach_find_label_issues(noisy):
    probs, given, valid, _ = noisy
    check = LabelCheck(method="self_confidence", frac_flagged=0.1, temperature=1.0)
    res = check.run(_inputs(probs, given, valid))
    df = find_label_issues(probs, given, valid=valid, method="self_confidence", frac_flagged=0.1, temperature=1.0)
    np.testing.assert_array_equal(res.score, df["label_quality"].to_numpy())
    assert res.is_issue.sum() == round(0.1 * (len(given) - 4)) and res.params["method"] == "self_confidence"


# --------------------------------------------------------------------------- ensemble weights


def _unequal_models(seed: int = 0, n: int = 1200, c: int = 10):
    """Two good models and a noisy third one, all from the same true labels; 10% of given labels flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    probs = []
    for noise in (1.0, 1.0, 3.0):
        z = rng.normal(0, noise, (n, c))
        z[np.arange(n), true] += 4.0
        probs.append(softmax(z))
    given = true.copy()
    flip = rng.random(n) < 0.1
    given[flip] = (true[flip] + rng.integers(1, c, flip.sum())) % c
    return probs, given, flip


def test_equal_weights_are_the_default_and_change_nothing():
    probs, given, _ = _unequal_models()
    base = find_label_issues(probs, given)
    pd.testing.assert_frame_equal(find_label_issues(probs, given, weights="equal"), base)
    given_equal = find_label_issues(probs, given, weights=[2.0, 2.0, 2.0])  # the same mean, another arithmetic
    np.testing.assert_allclose(given_equal["label_quality"], base["label_quality"], atol=1e-6)
    assert base.attrs["flag_params"]["weights_used"] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("how", ["fit", "softmax"])
def test_fitted_weights_count_the_model_that_explains_the_labels_more(how):
    from sklearn.metrics import average_precision_score

    probs, given, flip = _unequal_models()
    df = find_label_issues(probs, given, weights=how)
    w = df.attrs["flag_params"]["weights_used"]
    assert sum(w) == pytest.approx(1) and w[2] < min(w[0], w[1]) and w[0] == pytest.approx(w[1], abs=0.1)
    assert df.attrs["flag_params"]["weights"] == how
    # Counting the noisy model less ranks the flipped labels at least as well as the uniform mean does here.
    ap = {
        k: average_precision_score(flip, 1 - find_label_issues(probs, given, weights=k)["label_quality"])
        for k in ("equal", how)
    }
    assert ap[how] >= ap["equal"] - 0.005
    dis = df["model_disagreement_score"].to_numpy()
    assert np.all((dis >= 0) & (dis <= 1))


def test_the_convex_fit_maximises_the_likelihood_of_the_given_labels():
    """No other point of the simplex explains the given labels better than the fitted weights (a coarse grid)."""
    probs, given, _ = _unequal_models(seed=1, n=600)
    df = find_label_issues(probs, given, weights="fit")
    temps = df.attrs["flag_params"]["temperatures_used"]
    py = []
    for p, t in zip(probs, temps, strict=True):
        z = np.log(np.maximum(p.astype(np.float64), 1e-30)) / t
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        py.append(q[np.arange(len(given)), given])
    py = np.stack(py, axis=1)

    def loglik(w):
        return float(np.log(py @ np.asarray(w)).sum())

    best = loglik(df.attrs["flag_params"]["weights_used"])
    grid = [(a / 20, b / 20, 1 - (a + b) / 20) for a in range(21) for b in range(21 - a)]
    assert best >= max(loglik(w) for w in grid) - 1e-6


def test_one_model_gets_all_the_weight_and_the_label_check_passes_weights_on():
    probs, given, _ = _unequal_models()
    one = find_label_issues(probs[:1], given, weights="fit")
    assert one.attrs["flag_params"]["weights_used"] == [1.0]
    res = LabelCheck(weights="fit").run(_inputs(probs, given, np.ones(len(given), bool)))
    assert res.params["weights"] == "fit" and res.summary["weights_used"][2] < 0.3


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("best", r"weights is 'best', expected one of 'equal', 'fit', 'softmax'"),
        ([1.0, 2.0], r"weights has 2 values, expected one per model \(M=3\)"),
        ([1.0, -1.0, 1.0], r"weights holds -1.0, expected finite non-negative numbers"),
        ([0, 0, 0], r"weights are all 0"),
        (0.5, r"weights is 0.5, expected one of"),
    ],
)
def test_bad_weights_say_what_was_expected(weights, message):
    probs, given, _ = _unequal_models(n=60)
    with pytest.raises(ValueError, match=message):
        find_label_issues(probs, given, weights=weights)
