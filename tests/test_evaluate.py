"""Tests of audit.evaluate: hand-computed cases, properties, and a cross-check with timm."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import evaluate as ev
from audit.evaluate import (
    Metric,
    choose_threshold,
    clean_accuracy,
    confusion_pairs,
    evaluate_all,
    mean_interval,
    original_accuracy,
    real_accuracy,
    relabeled_accuracy,
    sigmoid_evaluation,
    wilson_interval,
)

nan_safe = dict(nan_ok=True)


def by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.metric: m for m in metrics}


def values(metrics: list[Metric]) -> dict[str, float]:
    return {m.metric: m.value for m in metrics}


# Shared small example: 5 images, K=3 ranked classes.
TOPK = np.array(
    [
        [0, 1, 2],  # img0
        [1, 0, 2],  # img1
        [2, 1, 0],  # img2
        [0, 2, 1],  # img3
        [3, 0, 1],  # img4
    ]
)
LABELS = np.array([0, 0, -1, 1, 3])
REAL = [[1], [0, 3, 0], [], [0], [3, 4]]


# --------------------------------------------------------------------------- intervals


def test_wilson_known_value():
    # 8/10, z=1.96: centre (0.8 + 0.19207) / 1.38415 = 0.7168,
    # half 1.41603 * sqrt(0.016 + 0.0096) = 0.2266 -> (0.4902, 0.9434)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=2e-4)


def test_wilson_edges():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.65 < low < 1
    # A wider confidence gives a wider interval.
    assert wilson_interval(8, 10, confidence=0.99)[0] < 0.4902
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.5)


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_proportion_and_is_symmetric(sn):
    s, n = sn
    low, high = wilson_interval(s, n)
    if n == 0:
        assert math.isnan(low) and math.isnan(high)
        return
    assert 0 <= low <= s / n <= high <= 1
    mirror_low, mirror_high = wilson_interval(n - s, n)
    assert low == pytest.approx(1 - mirror_high, abs=1e-12)
    assert high == pytest.approx(1 - mirror_low, abs=1e-12)


def test_mean_interval_fractional():
    # mean 0.5; deviations 0, 0, .5, -.5 -> var (ddof 1) 0.5 / 3, sd 0.40825;
    # half = 1.95996 * 0.40825 / 2 = 0.40008
    low, high = mean_interval(np.array([0.5, 0.5, 1.0, 0.0]))
    assert low == pytest.approx(0.5 - 0.40008, abs=1e-4)
    assert high == pytest.approx(0.5 + 0.40008, abs=1e-4)


def test_mean_interval_binary_uses_wilson_and_clips():
    assert mean_interval(np.array([1.0] * 8 + [0.0] * 2)) == wilson_interval(8, 10)
    assert mean_interval(np.array([0.9, 1.0, 1.0, 0.95]))[1] == 1.0
    assert mean_interval(np.array([0.5])) == (0.0, 1.0)
    assert all(math.isnan(x) for x in mean_interval(np.array([])))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mean_interval(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="shape"):
        mean_interval(np.zeros((2, 2)))


# --------------------------------------------------------------------------- accuracies


def test_original_accuracy_hand_computed():
    # img0: label 0 at rank 0; img1: label 0 at rank 1; img2: label -1, excluded;
    # img3: label 1 at rank 2; img4: label 3 at rank 0.
    # top1 = 2/4, top2 = 3/4, top3 = 4/4; top5 skipped because K = 3.
    got = by_name(original_accuracy(TOPK, LABELS, ks=(1, 2, 3, 5)))
    assert list(got) == ["top1", "top2", "top3"]
    assert got["top1"].value == 0.5 and got["top2"].value == 0.75 and got["top3"].value == 1.0
    assert {m.n for m in got.values()} == {4}
    assert (got["top1"].low, got["top1"].high) == wilson_interval(2, 4)
    assert all(m.evaluation == "original" and m.params == {} for m in got.values())


def test_original_accuracy_valid_mask():
    # Dropping img1 and img4: img0 (rank 0) and img3 (rank 2) remain -> top1 1/2, top3 2/2.
    valid = np.array([True, False, True, True, False])
    # Invalid rows may hold garbage (here -1) and are not read.
    topk = TOPK.copy()
    topk[1] = -1
    got = values(original_accuracy(topk, LABELS, ks=(1, 3), valid=valid))
    assert got == {"top1": 0.5, "top3": 1.0}
    assert original_accuracy(TOPK, LABELS, valid=valid)[0].n == 2


def test_original_accuracy_nothing_to_evaluate():
    (m,) = original_accuracy(TOPK, np.full(5, -1), ks=(1,))
    assert m.n == 0 and math.isnan(m.value) and math.isnan(m.low) and math.isnan(m.high)


def test_real_accuracy_hand_computed():
    # img0 {1}: rank 1; img1 {0,3}: rank 1; img2: empty set, left out;
    # img3 {0}: rank 0; img4 {3,4}: rank 0.  top1 = 2/4, top2 = 4/4.
    got = by_name(real_accuracy(TOPK, REAL, ks=(1, 2)))
    assert values(got.values()) == {"top1": 0.5, "top2": 1.0}
    assert got["top1"].n == 4 and got["top1"].evaluation == "real"


def test_real_accuracy_empty_sets_and_valid():
    # Only img3 and img4 are valid with a non-empty set; both right at rank 0.
    valid = np.array([False, False, True, True, True])
    got = real_accuracy(TOPK, REAL, ks=(1,), valid=valid)
    assert got[0].value == 1.0 and got[0].n == 2
    none = real_accuracy(TOPK, [[]] * 5)
    assert all(m.n == 0 and math.isnan(m.value) for m in none)


def test_clean_accuracy_hand_computed():
    # Given label inside the ReaL set: img1 (0 in {0,3}) and img4 (3 in {3,4}).
    # img0: 0 not in {1}; img2: label -1; img3: 1 not in {0}.
    # Top-1 vs the given label: img1 predicts 1 (wrong), img4 predicts 3 (right) -> 1/2.
    (m,) = clean_accuracy(TOPK, LABELS, REAL)
    assert (m.evaluation, m.metric, m.value, m.n) == ("clean", "top1", 0.5, 2)
    (m,) = clean_accuracy(TOPK, LABELS, REAL, valid=np.array([True] * 4 + [False]))
    assert (m.value, m.n) == (0.0, 1)


def test_relabeled_accuracy_hand_computed():
    # img0 {2}: rank 2; img1 []: out; img2 {2}: rank 0; img3 {5}: never; img4 {0,1}: rank 1.
    # top1 = 1/4, top2 = 2/4, top3 = 3/4.
    sets = [[2], [], [2], [5], [1, 0]]
    got = relabeled_accuracy(TOPK, sets, ks=(1, 2, 3))
    assert values(got) == {"top1": 0.25, "top2": 0.5, "top3": 0.75}
    assert {m.evaluation for m in got} == {"relabeled"} and got[0].n == 4


def test_accuracy_accepts_numpy_sets_and_int32():
    sets = [np.array(s, dtype=np.int32) for s in REAL]
    assert values(real_accuracy(TOPK.astype(np.int32), sets)) == values(real_accuracy(TOPK, REAL))


# --------------------------------------------------------------------------- validation


def test_shape_errors_name_expected_and_seen():
    with pytest.raises(ValueError, match=r"labels has shape \(4,\), expected \(N,\)=\(5,\)"):
        original_accuracy(TOPK, LABELS[:4])
    with pytest.raises(ValueError, match=r"topk has shape \(5,\)"):
        original_accuracy(LABELS, LABELS)
    with pytest.raises(ValueError, match=r"valid has shape \(3,\), expected \(N,\)=\(5,\)"):
        original_accuracy(TOPK, LABELS, valid=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="real_sets has 4 entries, expected N=5"):
        real_accuracy(TOPK, REAL[:4])
    with pytest.raises(ValueError, match=r"scores has shape \(5, 4\), expected \(N, C\)=\(3, C\)"):
        sigmoid_evaluation(np.zeros((5, 4)), [[0]] * 3, threshold=0.5)


def test_value_errors():
    with pytest.raises(ValueError, match="dtype float64, expected integer"):
        original_accuracy(TOPK.astype(float), LABELS)
    with pytest.raises(ValueError, match="valid has dtype"):
        original_accuracy(TOPK, LABELS, valid=np.ones(5))
    with pytest.raises(ValueError, match=r"labels lie in \[-2, 3\]"):
        original_accuracy(TOPK, np.array([0, 0, -2, 1, 3]))
    with pytest.raises(ValueError, match="topk holds class indices"):
        original_accuracy(-TOPK - 1, LABELS)
    with pytest.raises(ValueError, match=r"real_sets\[3\] holds class -4"):
        real_accuracy(TOPK, [[1], [0], [], [2, -4], [3]])
    with pytest.raises(ValueError, match="must hold ints"):
        real_accuracy(TOPK, [[1.5], [0], [], [2], [3]])
    with pytest.raises(ValueError, match="lists of ints"):
        real_accuracy(TOPK, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="ks must be"):
        original_accuracy(TOPK, LABELS, ks=(0, 1))
    with pytest.raises(ValueError, match="limit"):
        confusion_pairs(TOPK[:, 0], LABELS, limit=-1)


# --------------------------------------------------------------------------- sigmoid

SCORES = np.array(
    [
        [0.9, 0.6, 0.2, 0.1],
        [0.3, 0.8, 0.7, 0.05],
        [0.1, 0.2, 0.3, 0.4],
    ]
)
SIG_SETS = [[0, 1], [2], [0]]


def test_sigmoid_fixed_threshold_hand_computed():
    # t = 0.5: img0 P={0,1}, R={0,1}: p 1, r 1, f1 1, exact 1.
    #          img1 P={1,2}, R={2}: p 1/2, r 1, f1 2*1/(2+1) = 2/3, exact 0.
    #          img2 nothing > t, so P={argmax}={3}, R={0}: all 0.
    # Means: precision 1.5/3 = 1/2, recall 2/3, f1 (5/3)/3 = 5/9, exact 1/3.
    got = by_name(sigmoid_evaluation(SCORES, SIG_SETS, threshold=0.5))
    assert list(got) == ["precision", "recall", "f1", "exact_match"]
    assert got["precision"].value == pytest.approx(1 / 2)
    assert got["recall"].value == pytest.approx(2 / 3)
    assert got["f1"].value == pytest.approx(5 / 9)
    assert got["exact_match"].value == pytest.approx(1 / 3)
    assert (got["exact_match"].low, got["exact_match"].high) == wilson_interval(1, 3)
    for m in got.values():
        assert m.evaluation == "sigmoid" and m.n == 3
        assert m.params == {"threshold": 0.5, "threshold_method": "fixed", "threshold_scale": "probability"}


def test_sigmoid_max_set_caps_prediction():
    # max_set=1 leaves only the argmax: img0 P={0}: p 1, r 1/2, f1 2/3; img1 P={1}: 0; img2: 0.
    got = values(sigmoid_evaluation(SCORES, SIG_SETS, threshold=0.5, max_set=1))
    assert got["precision"] == pytest.approx(1 / 3)
    assert got["recall"] == pytest.approx(1 / 6)
    assert got["f1"] == pytest.approx(2 / 9)
    assert got["exact_match"] == 0.0


def test_sigmoid_skips_empty_sets_and_invalid_rows():
    # Row 3 is invalid and all NaN; row 4 has an empty ReaL set. Neither is read.
    scores = np.vstack([SCORES, np.full((1, 4), np.nan), [[0.9, 0.9, 0.9, 0.9]]])
    valid = np.array([True, True, True, False, True])
    got = sigmoid_evaluation(scores, [*SIG_SETS, [1], []], threshold=0.5, valid=valid)
    assert values(got) == values(sigmoid_evaluation(SCORES, SIG_SETS, threshold=0.5))
    assert {m.n for m in got} == {3}


def test_choose_threshold_hand_computed():
    # Mean F1 by threshold:
    #   0.1 : img0 P={0,1,2} f1 2*2/5 = .8; img1 P={0,1,2} f1 2/4 = .5; img2 P={1,2,3} 0 -> .433
    #   0.5 : 5/9 = .556 (see above)
    #   0.75: img0 P={0} f1 2/3; img1 P={1} 0; img2 0 -> .222
    #   0.95: only argmaxes, as for 0.75 -> .222
    assert choose_threshold(SCORES, SIG_SETS, grid=np.array([0.1, 0.5, 0.75, 0.95])) == 0.5
    # Ties go to the smallest threshold (0.75 and 0.95 both give 2/9).
    assert choose_threshold(SCORES, SIG_SETS, grid=np.array([0.95, 0.75])) == 0.95
    assert 0 < choose_threshold(SCORES, SIG_SETS) < 1
    with pytest.raises(ValueError, match="no valid image"):
        choose_threshold(SCORES, [[], [], []])
    with pytest.raises(ValueError, match="grid"):
        choose_threshold(SCORES, SIG_SETS, grid=np.array([]))


def random_multilabel(n: int, c: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Scores that are informative but noisy, and random ReaL sets of 0-3 classes."""
    rng = np.random.default_rng(seed)
    sets = [sorted(rng.choice(c, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(n)]
    truth = np.zeros((n, c))
    for i, s in enumerate(sets):
        truth[i, s] = 1
    logits = 3 * truth - 2 + 1.5 * rng.standard_normal((n, c))
    return 1 / (1 + np.exp(-logits)), sets


def test_sigmoid_cross_fit_matches_manual_folds():
    scores, sets = random_multilabel(200, 12, seed=1)
    valid = np.ones(200, dtype=bool)
    valid[::17] = False
    got = by_name(sigmoid_evaluation(scores, sets, valid=valid, seed=7))
    method = {m.params["threshold_method"] for m in got.values()}
    assert method == {"2-fold cross-fit, max F1"}
    threshold = got["f1"].params["threshold"]
    assert 0 < threshold < 1

    # The documented algorithm, by hand: seeded split of the evaluable images, each
    # fold's threshold chosen on the other fold.
    rows = np.flatnonzero(valid & np.array([len(s) > 0 for s in sets]))
    perm = np.random.default_rng(7).permutation(rows.size)
    halves = [rows[perm[: rows.size // 2]], rows[perm[rows.size // 2 :]]]
    masks = [np.isin(np.arange(200), h) for h in halves]
    t_a, t_b = (choose_threshold(scores, sets, valid=m) for m in masks)
    assert threshold == pytest.approx((t_a + t_b) / 2)
    on_a = values(sigmoid_evaluation(scores, sets, threshold=t_b, valid=masks[0]))
    on_b = values(sigmoid_evaluation(scores, sets, threshold=t_a, valid=masks[1]))
    n_a, n_b = len(halves[0]), len(halves[1])
    assert got["f1"].n == n_a + n_b
    for name, m in got.items():
        assert m.value == pytest.approx((n_a * on_a[name] + n_b * on_b[name]) / (n_a + n_b))

    # Same seed, same answer; a fixed threshold reports "fixed".
    assert sigmoid_evaluation(scores, sets, valid=valid, seed=7) == list(got.values())
    fixed = sigmoid_evaluation(scores, sets, threshold=threshold)
    assert {m.params["threshold_method"] for m in fixed} == {"fixed"}


def test_sigmoid_cross_fit_separable():
    # Positives at 0.9, negatives at 0.15: every threshold in [0.15, 0.9) is perfect and
    # the smallest grid point above 0.15 (the grid is even in logit space) wins on both folds.
    sets = [[i % 5, (i + 1) % 5] if i % 3 else [i % 5] for i in range(30)]
    scores = np.full((30, 5), 0.15)
    for i, s in enumerate(sets):
        scores[i, s] = 0.9
    got = by_name(sigmoid_evaluation(scores, sets))
    grid = 1 / (1 + np.exp(-np.arange(-4.0, 14.0001, 0.25)))
    assert got["f1"].params["threshold"] == pytest.approx(grid[grid > 0.15].min())
    assert all(m.value == 1.0 for m in got.values())


def test_sigmoid_edge_cases():
    with pytest.raises(ValueError, match="at least 2"):
        sigmoid_evaluation(SCORES, [[0], [], []])
    assert sigmoid_evaluation(SCORES, [[0], [], []], threshold=0.5)[0].n == 1
    empty = sigmoid_evaluation(SCORES, [[], [], []])
    assert all(m.n == 0 and math.isnan(m.value) for m in empty)
    with pytest.raises(ValueError, match=r"scores\[1, 0\] is 3.0, expected a probability"):
        sigmoid_evaluation(np.array([[0.5, 0.5], [3.0, 0.1]]), [[0], [1]], threshold=0.5)
    with pytest.raises(ValueError, match="holds class 4, but scores has only C=4"):
        sigmoid_evaluation(SCORES, [[4], [0], [1]], threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        sigmoid_evaluation(SCORES, SIG_SETS, threshold=math.nan)
    with pytest.raises(ValueError, match="max_set"):
        sigmoid_evaluation(SCORES, SIG_SETS, threshold=0.5, max_set=0)


def test_sigmoid_chunking_does_not_change_results(monkeypatch):
    scores, sets = random_multilabel(60, 9, seed=3)
    scores = scores.astype(np.float32)  # read chunk by chunk, never copied whole
    expected = sigmoid_evaluation(scores, sets, max_set=4)
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 7)  # one row per chunk
    assert sigmoid_evaluation(scores, sets, max_set=4) == expected


# --------------------------------------------------------------------------- evaluate_all


def test_evaluate_all_runs_what_inputs_allow():
    def kinds(ms: list[Metric]) -> list[tuple[str, str]]:
        return [(m.evaluation, m.metric) for m in ms]

    assert kinds(evaluate_all(TOPK, LABELS)) == [("original", "top1")]
    # Scores without ReaL sets cannot be scored and are ignored.
    assert kinds(evaluate_all(TOPK, LABELS, scores=np.zeros((5, 5)))) == [("original", "top1")]
    sig_scores = np.vstack([np.hstack([SCORES, np.zeros((3, 1))]), np.full((2, 5), 0.5)])
    full = evaluate_all(
        TOPK,
        LABELS,
        real_sets=REAL,
        scores=sig_scores,
        label_sets=[[0]] * 5,
        threshold=0.5,
    )
    assert kinds(full) == [
        ("original", "top1"),
        ("real", "top1"),
        ("clean", "top1"),
        ("sigmoid", "precision"),
        ("sigmoid", "recall"),
        ("sigmoid", "f1"),
        ("sigmoid", "exact_match"),
        ("relabeled", "top1"),
    ]
    assert full[:3] == [
        *original_accuracy(TOPK, LABELS),
        *real_accuracy(TOPK, REAL),
        *clean_accuracy(TOPK, LABELS, REAL),
    ]
    assert full[3:7] == sigmoid_evaluation(sig_scores, REAL, threshold=0.5)
    assert full[7:] == relabeled_accuracy(TOPK, [[0]] * 5)


def test_metric_is_frozen():
    m = original_accuracy(TOPK, LABELS)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.value = 1.0  # type: ignore[misc]
    assert Metric("a", "b", 0.5, 0.1, 0.9, 3).params == {}


# --------------------------------------------------------------------------- confusion pairs


def test_confusion_pairs_hand_computed():
    top1 = np.array([1, 1, 2, 1, 2, 0, 0])
    labels = np.array([0, 0, 0, 0, 3, -1, 0])
    valid = np.array([True, True, True, False, True, True, True])
    # (given, predicted): img0 (0,1), img1 (0,1), img2 (0,2), img3 invalid, img4 (3,2),
    # img5 excluded, img6 right.  Ties on count 1 by given label.
    assert confusion_pairs(top1, labels, valid=valid) == [(0, 1, 2), (0, 2, 1), (3, 2, 1)]
    assert confusion_pairs(top1, labels, valid=valid, limit=1) == [(0, 1, 2)]
    assert confusion_pairs(top1, labels)[0] == (0, 1, 3)
    assert confusion_pairs(np.stack([top1, top1], axis=1), labels) == confusion_pairs(top1, labels)
    assert confusion_pairs(labels + 1, labels + 1) == []


# --------------------------------------------------------------------------- properties


@st.composite
def predictions(draw):
    n = draw(st.integers(0, 25))
    c = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(c, 6)))
    topk = np.array([draw(st.permutations(range(c)))[:k] for _ in range(n)], dtype=np.int64).reshape(n, k)
    labels = np.array(draw(st.lists(st.integers(-1, c - 1), min_size=n, max_size=n)), dtype=int)
    sets = draw(st.lists(st.lists(st.integers(0, c - 1), max_size=3), min_size=n, max_size=n))
    valid = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    return topk, labels, sets, valid


def singletons(labels: np.ndarray) -> list[list[int]]:
    return [[int(x)] if x >= 0 else [] for x in labels]


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_accuracies_lie_in_their_interval(p):
    topk, labels, sets, valid = p
    metrics = evaluate_all(topk, labels, real_sets=sets, label_sets=sets, valid=valid)
    for m in metrics:
        if m.n == 0:
            assert math.isnan(m.value) and math.isnan(m.low) and math.isnan(m.high)
        else:
            assert 0 <= m.low <= m.value <= m.high <= 1


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_singleton_sets_reproduce_original(p):
    topk, labels, _, valid = p
    ks = range(1, topk.shape[1] + 1)
    original = original_accuracy(topk, labels, ks=ks, valid=valid)
    assert _same(real_accuracy(topk, singletons(labels), ks=ks, valid=valid), original)
    assert _same(relabeled_accuracy(topk, singletons(labels), ks=ks, valid=valid), original)
    # Every labelled image agrees with its own singleton set, so clean == original top-1.
    assert _same(clean_accuracy(topk, labels, singletons(labels), valid=valid), original[:1])


def _same(a: list[Metric], b: list[Metric]) -> bool:
    def key(m: Metric):
        return (m.metric, m.n, *(("nan" if math.isnan(x) else x) for x in (m.value, m.low, m.high)))

    return [key(m) for m in a] == [key(m) for m in b]


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_topk_is_monotone_in_k(p):
    topk, labels, sets, valid = p
    ks = range(1, topk.shape[1] + 1)
    for ms in (
        original_accuracy(topk, labels, ks=ks, valid=valid),
        real_accuracy(topk, sets, ks=ks, valid=valid),
        relabeled_accuracy(topk, sets, ks=ks, valid=valid),
    ):
        vals = [m.value for m in ms]
        if not math.isnan(vals[0]):
            assert all(a <= b for a, b in itertools.pairwise(vals))
            assert len({m.n for m in ms}) == 1


@settings(max_examples=40, deadline=None)
@given(predictions(), st.integers(1, 5), st.floats(0, 1))
def test_sigmoid_properties(p, max_set, threshold):
    topk, _, sets, valid = p
    n, c = len(sets), max(topk.shape[1], 1)
    c = max(c, max((max(s) for s in sets if s), default=0) + 1)
    scores = np.random.default_rng(n * 31 + c).random((n, c))
    got = values(sigmoid_evaluation(scores, sets, threshold=threshold, valid=valid, max_set=max_set))
    if not math.isnan(got["f1"]):
        assert all(0 <= v <= 1 for v in got.values())
        # Exact match implies F1 = 1 image by image.
        assert got["exact_match"] <= got["f1"] + 1e-12
    # Above every score the predicted set is the argmax alone: precision == ReaL top-1.
    only_argmax = values(sigmoid_evaluation(scores, sets, threshold=1.0, valid=valid))
    real_top1 = real_accuracy(np.argmax(scores, axis=1)[:, None], sets, ks=(1,), valid=valid)
    assert only_argmax["precision"] == pytest.approx(real_top1[0].value, **nan_safe)


@settings(max_examples=40, deadline=None)
@given(predictions())
def test_confusion_pairs_count_every_disagreement(p):
    topk, labels, _, valid = p
    pairs = confusion_pairs(topk[:, 0], labels, valid=valid, limit=None)
    wrong = valid & (labels >= 0) & (topk[:, 0] != labels)
    assert sum(cnt for _, _, cnt in pairs) == int(wrong.sum())
    assert all(g != q for g, q, _ in pairs)
    keys = [(-cnt, g, q) for g, q, cnt in pairs]
    assert keys == sorted(keys)


# --------------------------------------------------------------------------- timm


def _timm_real_labels_module():
    """timm's ``timm/data/real_labels.py``, loaded on its own.

    ``import timm.data`` initialises every timm model module (seconds); the ReaL
    evaluator itself needs only numpy, so its file is loaded directly.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        pytest.skip("timm is not installed")
    path = Path(spec.origin).parent / "data" / "real_labels.py"
    module_spec = importlib.util.spec_from_file_location("_timm_real_labels", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_real_accuracy_matches_timm(tmp_path):
    torch = pytest.importorskip("torch")
    real_labels = _timm_real_labels_module()

    n, c, total = 400, 10, 50_000
    rng = np.random.default_rng(0)
    sets = [rng.choice(c, size=rng.integers(0, 4), replace=False).tolist() for _ in range(n)]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(sets + [[]] * (total - n)))
    # timm checks len(filenames) against the full 50,000-entry JSON and walks the
    # filenames in order as batches arrive.
    filenames = [f"val/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(total)]
    timm_real = real_labels.RealLabelsImagenet(filenames, real_json=str(path), topk=(1, 5))
    logits = rng.standard_normal((n, c)).astype(np.float32)
    for start in range(0, n, 64):
        timm_real.add_result(torch.tensor(logits[start : start + 64]))

    topk = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    ours = values(real_accuracy(topk, sets))
    assert timm_real.get_accuracy(k=1) == pytest.approx(100 * ours["top1"], abs=1e-9)
    assert timm_real.get_accuracy(k=5) == pytest.approx(100 * ours["top5"], abs=1e-9)


def test_sigmoid_evaluation_on_the_logit_scale_survives_logits_that_saturate_a_float32_sigmoid():
    # SqueezeNet's logits end in a ReLU and run 0..66: sigmoid(z) is exactly 1.0 in float32 for
    # z > 17, so dozens of classes tie at 1.0 and no threshold of the fixed grid separates them.
    rng = np.random.default_rng(0)
    n, c = 200, 50
    logits = rng.uniform(20, 45, size=(n, c)).astype(np.float32)
    truth = rng.integers(0, c, n)
    logits[np.arange(n), truth] = 60.0
    sets = [[int(t)] for t in truth]
    on_logits = {m.metric: m for m in sigmoid_evaluation(logits, sets, scale="logit")}
    assert on_logits["f1"].value == 1.0 and on_logits["f1"].params["threshold_scale"] == "logit"
    saturated = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    assert (saturated == 1.0).all()
    on_probs = {m.metric: m for m in sigmoid_evaluation(saturated, sets)}
    assert on_probs["f1"].value < 0.2  # what the probability scale made of it


def test_sigmoid_scale_is_validated():
    with pytest.raises(ValueError, match="scale is 'logits'"):
        sigmoid_evaluation(np.zeros((2, 3)), [[0], [1]], scale="logits")
    with pytest.raises(ValueError, match="expected a finite logit"):
        sigmoid_evaluation(np.array([[np.inf, 0.0], [0.0, 1.0]]), [[0], [1]], scale="logit")
