"""Tests of audit.flag on seeded synthetic probabilities and hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from audit.flag import (
    DEFAULT_KINDS,
    Ensemble,
    IssueKind,
    ModelDisagreement,
    MultiLabel,
    NoFit,
    WrongLabel,
    find_label_issues,
    flag_params,
)

KIND_NAMES = [k.name for k in DEFAULT_KINDS]
COLUMNS = [
    "index",
    "label_quality",
    "is_label_issue",
    "suggested_label",
    "suggested_confidence",
    "issue_kind",
    "rank",
    *[c for n in KIND_NAMES for c in (f"{n}_score", f"is_{n}_issue")],
]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def noisy_set(
    n: int = 1500, c: int = 20, m: int = 3, flip: float = 0.1, seed: int = 0, present: int | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """M models' probabilities generated from true labels; a fraction of given labels flipped.

    Returns probs, given labels, true labels, flipped mask.
    """
    rng = np.random.default_rng(seed)
    classes = present or c
    true = rng.integers(0, classes, n)
    shared = rng.normal(0, 1.0, (n, c))  # what every model finds hard about an image
    probs = []
    for _ in range(m):
        z = 1.5 * shared + rng.normal(0, 1.0, (n, c))
        z[np.arange(n), true] += 5.0
        probs.append(softmax(z))
    flipped = rng.random(n) < flip
    given = true.copy()
    shift = rng.integers(1, classes, flipped.sum())
    given[flipped] = (true[flipped] + shift) % classes
    return probs, given, true, flipped


@pytest.fixture(scope="module")
def synthetic():
    probs, given, true, flipped = noisy_set()
    return probs, given, true, flipped, find_label_issues(probs, given)


# --------------------------------------------------------------------------- ranking


def test_flipped_labels_rank_first(synthetic):
    _, _, _, flipped, df = synthetic
    ap = average_precision_score(flipped, 1 - df["label_quality"])
    assert flipped.mean() < 0.12  # chance level of AP
    assert ap > 0.85  # measured 0.93; the models are right on 86% of images
    flagged = df["is_label_issue"].to_numpy()
    # confident learning flags conservatively: high precision, moderate recall
    assert (flagged & flipped).sum() / flagged.sum() > 0.85
    assert (flagged & flipped).sum() / flipped.sum() > 0.6


def test_flipped_suggestions_are_the_true_labels(synthetic):
    _, _, true, flipped, df = synthetic
    hit = df["is_label_issue"].to_numpy() & flipped & (df["issue_kind"] == "wrong_label").to_numpy()
    assert hit.sum() > 50
    assert (df["suggested_label"].to_numpy()[hit] == true[hit]).mean() > 0.95


def test_columns_dtypes_and_ranges(synthetic):
    _, given, _, _, df = synthetic
    assert list(df.columns) == COLUMNS
    assert df["index"].tolist() == list(range(len(given)))
    assert df["index"].dtype == np.int64
    assert df["suggested_label"].dtype == np.int64
    assert df["rank"].dtype == "Int64"
    for col in ["label_quality", "suggested_confidence", *[f"{n}_score" for n in KIND_NAMES]]:
        assert df[col].dtype == np.float64
        assert df[col].between(0, 1).all(), col
    for col in ["is_label_issue", *[f"is_{n}_issue" for n in KIND_NAMES]]:
        assert df[col].dtype == bool
    flagged = df["is_label_issue"]
    assert set(df.loc[flagged, "issue_kind"]) <= set(KIND_NAMES)
    assert (df.loc[~flagged, "issue_kind"] == "").all()
    assert df.loc[~flagged, "rank"].isna().all()
    # rank 1..k follows label_quality upwards
    ranked = df[flagged].sort_values("rank")
    assert ranked["rank"].tolist() == list(range(1, flagged.sum() + 1))
    assert ranked["label_quality"].is_monotonic_increasing
    assert df.loc[flagged, "label_quality"].max() <= df.loc[~flagged, "label_quality"].min()
    # unflagged images keep their label
    assert (df.loc[~flagged, "suggested_label"].to_numpy() == given[~flagged.to_numpy()]).all()


def test_matches_cleanlab_scores_for_one_model_at_t1():
    from cleanlab.rank import get_label_quality_scores

    probs, given, _, _ = noisy_set(n=400, m=1, seed=1)
    for method in ("normalized_margin", "self_confidence", "confidence_weighted_entropy"):
        df = find_label_issues(probs, given, method=method, temperature=1.0)
        want = get_label_quality_scores(given, probs[0].astype(np.float64), method=method)
        np.testing.assert_allclose(df["label_quality"], want, atol=2e-6, err_msg=method)


def test_issue_count_is_cleanlabs_when_every_class_is_present():
    from cleanlab.count import num_label_issues

    probs, given, _, _ = noisy_set(n=600, m=1, seed=2)
    assert len(np.unique(given)) == probs[0].shape[1]
    df = find_label_issues(probs, given, temperature=1.0)
    assert df["is_label_issue"].sum() == num_label_issues(given, probs[0])


def test_temperature_fit_recovers_overconfidence():
    rng = np.random.default_rng(3)
    n, c = 3000, 10
    z = rng.normal(0, 2.0, (n, c))
    p_true = softmax(z).astype(np.float64)
    labels = np.array([rng.choice(c, p=p / p.sum()) for p in p_true])
    df = find_label_issues([softmax(2 * z)], labels)  # twice as sharp as the labels warrant
    (t,) = df.attrs["flag_params"]["temperatures_used"]
    assert t == pytest.approx(2.0, rel=0.1)


def test_frac_flagged():
    probs, given, _, _ = noisy_set(n=300, seed=4)
    df = find_label_issues(probs, given, frac_flagged=0.05)
    assert df["is_label_issue"].sum() == 15
    assert find_label_issues(probs, given, frac_flagged=0.0)["is_label_issue"].sum() == 0


# --------------------------------------------------------------------------- excluded rows


def test_nan_rows_and_excluded_labels_are_ignored():
    probs, given, _, _ = noisy_set(n=500, seed=5)
    probs = [p.copy() for p in probs]
    probs[1][[3, 10, 11]] = np.nan  # unscored images
    labels = given.copy()
    labels[[20, 21]] = -1  # excluded
    df = find_label_issues(probs, labels)
    skipped = [3, 10, 11, 20, 21]
    assert df.loc[skipped, "label_quality"].isna().all()
    assert not df.loc[skipped, "is_label_issue"].any()
    assert (df.loc[skipped, "suggested_label"] == -1).all()
    assert (df.loc[skipped, "issue_kind"] == "").all()
    assert df.attrs["flag_params"]["n_assessed"] == 495
    # The rest is exactly what the same images give on their own.
    keep = np.setdiff1d(np.arange(500), skipped)
    alone = find_label_issues([p[keep] for p in probs], labels[keep])
    np.testing.assert_allclose(df.loc[keep, "label_quality"], alone["label_quality"], rtol=1e-12)
    assert (df.loc[keep, "is_label_issue"].to_numpy() == alone["is_label_issue"].to_numpy()).all()


def test_valid_mask():
    probs, given, _, _ = noisy_set(n=200, seed=6)
    probs = [p.copy() for p in probs]
    probs[0][7] = np.nan
    valid = np.ones(200, dtype=bool)
    valid[7] = False
    valid[8] = False  # finite but declared unscored: never read
    df = find_label_issues(probs, given, valid=valid)
    assert df.loc[[7, 8], "label_quality"].isna().all()
    valid[7] = True
    with pytest.raises(ValueError, match=r"probs\[0\] row 7 is not finite but valid\[7\] is True"):
        find_label_issues(probs, given, valid=valid)


def test_absent_classes():
    # 1,000 columns, 60 classes labelled; some images truly belong to absent classes.
    rng = np.random.default_rng(7)
    n, c = 400, 1000
    true = rng.integers(0, 60, n)
    given = true.copy()
    strays = np.arange(0, n, 40)  # 10 images of absent classes, labelled as present ones
    true[strays] = 900 + np.arange(strays.size)
    probs = []
    for _ in range(3):
        z = rng.normal(0, 1.0, (n, c))
        z[np.arange(n), true] += 12.0
        probs.append(softmax(z))
    df = find_label_issues(probs, given)
    assert df.attrs["flag_params"]["n_absent_classes"] == c - 60
    assert df.loc[strays, "is_label_issue"].all()
    assert (df.loc[strays, "suggested_label"].to_numpy() == true[strays]).all()
    assert df.loc[strays, "rank"].max() == strays.size


# --------------------------------------------------------------------------- kinds


def _hand_made() -> tuple[list[np.ndarray], np.ndarray]:
    """Rows 0-3 built for one kind each, then 16 clean rows."""
    c = 8
    base = np.full((20, c), 0.01 / (c - 1))
    for i in range(20):
        base[i, i % c] = 0.99
    models = [base.copy() for _ in range(3)]
    labels = np.arange(20) % c
    labels[:4] = 0
    for p in models:
        p[0] = [0.01, 0, 0, 0.99, 0, 0, 0, 0]  # the label (0) is clearly wrong: class 3
        p[1] = [0.5, 0.5, 0, 0, 0, 0, 0, 0]  # two classes fit
        p[2] = np.full(c, 1 / c)  # nothing fits
    for j, p in enumerate(models):  # each model sure of a different class
        p[3] = np.eye(c)[j + 1] * 0.97 + 0.03 / c
    return [p.astype(np.float32) for p in models], labels


def test_each_kind_fires_on_its_case():
    probs, labels = _hand_made()
    df = find_label_issues(probs, labels, temperature=1.0, frac_flagged=0.2)
    assert df["is_label_issue"].tolist() == [True] * 4 + [False] * 16
    assert df["issue_kind"][:4].tolist() == ["wrong_label", "multi_label", "no_fit", "model_disagreement"]
    for i, name in enumerate(KIND_NAMES):
        assert df.loc[i, f"is_{name}_issue"], name
        assert df.loc[i, f"{name}_score"] == df.loc[i, [f"{n}_score" for n in KIND_NAMES]].max()
    assert df.loc[1, "multi_label_score"] == pytest.approx(1.0)
    assert df.loc[2, "no_fit_score"] == pytest.approx(1 - 1 / 8)
    assert df.loc[3, "model_disagreement_score"] > 0.8
    assert not df.loc[4:, [f"is_{n}_issue" for n in KIND_NAMES]].to_numpy().any()
    # suggestions: the better class, the other valid class, none, the ensemble's choice
    assert df.loc[0, "suggested_label"] == 3
    assert df.loc[0, "suggested_confidence"] == pytest.approx(0.99, abs=1e-6)
    assert df.loc[1, "suggested_label"] == 1
    assert df.loc[2, "suggested_label"] == -1
    assert df.loc[3, "suggested_label"] in (1, 2, 3)


def test_kind_thresholds_and_custom_plugin():
    class Always(IssueKind):
        name = "always"

        def score(self, ens: Ensemble) -> np.ndarray:
            return np.ones(len(ens))

    probs, labels = _hand_made()
    kinds = [WrongLabel(threshold=0.99), MultiLabel(), NoFit(), ModelDisagreement(), Always()]
    df = find_label_issues(probs, labels, temperature=1.0, frac_flagged=0.2, kinds=kinds)
    assert "always_score" in df and df["is_always_issue"].all()
    assert not df.loc[0, "is_wrong_label_issue"]  # 0.98 < 0.99
    # ties at score 1 go to the first kind listed: multi_label (1.0) beats always
    assert df["issue_kind"][:4].tolist() == ["always", "multi_label", "always", "always"]
    assert [k["name"] for k in df.attrs["flag_params"]["kinds"]] == [k.name for k in kinds]


def test_plugin_output_is_checked():
    class Broken(IssueKind):
        name = "broken"

        def score(self, ens: Ensemble) -> np.ndarray:
            return np.full(len(ens), 2.0)

    probs, labels = _hand_made()
    with pytest.raises(ValueError, match="'broken' returned scores outside"):
        find_label_issues(probs, labels, kinds=[Broken()])


# --------------------------------------------------------------------------- contract


def test_deterministic_and_inputs_untouched():
    probs, given, _, _ = noisy_set(n=300, seed=8)
    for p in probs:
        p.setflags(write=False)  # any write into the caller's arrays would raise
    before = [p.copy() for p in probs]
    a = find_label_issues(probs, given)
    b = find_label_issues(probs, given)
    pd.testing.assert_frame_equal(a, b)
    for p, q in zip(probs, before, strict=True):
        np.testing.assert_array_equal(p, q)


def test_memmap_input(tmp_path):
    probs, given, _, _ = noisy_set(n=300, seed=9)
    paths = []
    for j, p in enumerate(probs):
        paths.append(tmp_path / f"m{j}.npy")
        np.save(paths[-1], p)
    df = find_label_issues([np.load(f, mmap_mode="r") for f in paths], given)
    pd.testing.assert_frame_equal(df, find_label_issues(probs, given))


def test_flag_params_is_json_and_complete():
    import cleanlab

    p = flag_params()
    assert p["cleanlab_version"] == cleanlab.__version__
    assert p["method"] == "normalized_margin" and p["temperature"] == "fit"
    json.dumps(p)
    probs, given, _, _ = noisy_set(n=200, seed=10)
    got = find_label_issues(probs, given).attrs["flag_params"]
    json.dumps(got)
    assert len(got["temperatures_used"]) == 3
    assert got["n_flagged"] == int(find_label_issues(probs, given)["is_label_issue"].sum())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probs": np.ones((4, 3)) / 3}, r"probs must be a list of M \(N, C\) arrays.*got an array of shape \(4, 3\)"),
        ({"probs": []}, "probs is empty"),
        ({"probs": [np.ones(4)]}, r"probs\[0\] has shape \(4,\), expected \(N, C\)"),
        ({"probs": [np.ones((4, 3), dtype=int)]}, r"probs\[0\] has dtype int64, expected floats"),
        (
            {"probs": [np.full((4, 3), 1 / 3), np.full((4, 2), 0.5)]},
            r"probs\[1\] has shape \(4, 2\) but probs\[0\] has",
        ),
        ({"probs": [np.ones((4, 1))]}, "C=1 classes, expected at least 2"),
        ({"probs": [np.full((4, 3), 2.0)]}, r"expected probabilities in \[0, 1\] \(pass softmax\(logits\)"),
        ({"probs": [np.full((4, 3), 0.3)]}, r"row 0 sums to 0.9, expected rows of probabilities summing to 1"),
        ({"labels": np.zeros(5, dtype=int)}, r"labels has shape \(5,\), expected \(N,\)=\(4,\)"),
        ({"labels": np.zeros(4)}, "labels has dtype float64, expected integers"),
        (
            {"labels": np.array([0, 1, 2, 3])},
            r"labels lie in \[0, 3\], expected -1 \(excluded\) or a class index in \[0, 2\]",
        ),
        ({"valid": np.ones(4, dtype=int)}, "valid has dtype int64, expected bool"),
        ({"method": "margin"}, "method is 'margin', expected one of 'normalized_margin'"),
        ({"frac_flagged": 1.5}, r"frac_flagged is 1.5, expected None or a fraction in \[0, 1\]"),
        ({"temperature": 0}, "temperature holds 0, expected finite positive numbers"),
        ({"temperature": "auto"}, "temperature is 'auto', expected 'fit'"),
        ({"temperature": [1.0, 1.0]}, r"temperature has 2 values, expected one per model \(M=1\)"),
        ({"kinds": [NoFit(), NoFit()]}, "two issue kinds are named 'no_fit'"),
        ({"kinds": ["no_fit"]}, "expected IssueKind instances"),
    ],
)
def test_input_validation(kwargs, message):
    args = {"probs": [np.full((4, 3), 1 / 3)], "labels": np.array([0, 1, 2, -1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        find_label_issues(args.pop("probs"), args.pop("labels"), **args)


def test_kind_threshold_validation():
    with pytest.raises(ValueError, match=r"NoFit threshold must be a float in \[0, 1\], got 2"):
        NoFit(threshold=2)


def test_nothing_to_assess():
    probs = [np.full((3, 4), 0.25, dtype=np.float32)]
    df = find_label_issues(probs, np.full(3, -1))
    assert list(df.columns) == COLUMNS
    assert not df["is_label_issue"].any()
    assert df["label_quality"].isna().all()
