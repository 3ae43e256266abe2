"""Cross-validated linear heads: out-of-fold predictions, the folds rule, sklearn's objective."""

from __future__ import annotations

import numpy as np
import pytest

from audit.heads import cross_val_head, standardize


def _blobs(n: int = 400, d: int = 16, c: int = 4, sep: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * sep
    y = rng.integers(0, c, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_heads_learn_separable_classes_and_give_probabilities(kind):
    x, y = _blobs()
    r = cross_val_head(x, y, n_classes=4, kind=kind, folds=5)
    assert r.probs.shape == r.scores.shape == r.logits.shape == (400, 4)
    assert (r.probs.argmax(1) == y).mean() > 0.95
    assert np.allclose(r.probs.sum(1), 1, atol=1e-5)
    assert ((r.scores >= 0) & (r.scores <= 1)).all()
    assert sorted(set(r.fold.tolist())) == list(range(5))
    assert r.params["C"] == r.C and r.C in r.params["c_evaluated"]
    assert set(r.params["c_grid"]) <= set(r.params["c_evaluated"])


def test_a_best_c_on_the_grid_edge_extends_the_grid_past_it():
    # Well separated blobs want little regularisation: a grid of strong ones ends at its top edge.
    x, y = _blobs(sep=4.0, seed=3)
    r = cross_val_head(x, y, n_classes=4, folds=5, c_grid=(1e-4, 1e-3))
    ev = r.params["c_evaluated"]
    assert ev[:2] == [1e-4, 1e-3] and len(ev) in (3, 4)  # at most two steps past the edge
    assert ev[2] == pytest.approx(1e-2) and r.C > 1e-3
    # A best C inside the grid adds nothing.
    grid = [10.0**k for k in range(-4, 3)]
    hx, hy = _blobs(d=64, sep=0.15, seed=3)  # overlapping classes in many dimensions want regularisation
    wide = cross_val_head(hx, hy, n_classes=4, folds=5, c_grid=grid)
    assert grid[0] < wide.C < grid[-1] and wide.params["c_evaluated"] == grid


def test_predictions_are_out_of_fold_so_a_wrong_label_gets_a_low_probability():
    x, y = _blobs(seed=1)
    given = y.copy()
    wrong = np.arange(0, 400, 40)
    given[wrong] = (y[wrong] + 1) % 4  # ten images labelled as the next class
    r = cross_val_head(x, given, n_classes=4, folds=10, c_grid=(10.0,))
    p_given = r.probs[np.arange(400), given]
    # Out of fold, the head never saw a wrong label's image: it predicts the true class.
    assert (p_given[wrong] < 0.2).all(), p_given[wrong]
    assert (r.probs[wrong].argmax(1) == y[wrong]).all()
    # In sample, a weakly regularised head would have been pulled toward the wrong labels.
    assert np.median(np.delete(p_given, wrong)) > 0.9


def test_same_seed_same_result_and_other_seed_other_folds():
    x, y = _blobs(n=200)
    a = cross_val_head(x, y, n_classes=4, folds=4, seed=3)
    b = cross_val_head(x, y, n_classes=4, folds=4, seed=3)
    c = cross_val_head(x, y, n_classes=4, folds=4, seed=4)
    assert np.array_equal(a.logits, b.logits) and np.array_equal(a.fold, b.fold)
    assert not np.array_equal(a.fold, c.fold)


def test_small_classes_are_spread_over_folds_and_single_images_are_unseen():
    x, y = _blobs(n=300, c=3)
    x = np.concatenate([x, _blobs(n=4, c=1, seed=9)[0] + 20])
    y = np.concatenate([y, [3, 3, 3, 4]])  # class 3: three images; class 4: one image
    r = cross_val_head(x, y, n_classes=5, folds=10)
    assert len(set(r.fold[-4:-1].tolist())) == 3  # each of class 3's images held out in its own fold
    assert r.params["unseen"] == 1  # class 4's only image: no head that predicts it saw the class
    assert r.probs[-1, 4] < 0.5


def test_every_class_smaller_than_the_folds_still_cross_validates():
    # 4 classes of 5 images, 10 folds: scikit-learn's StratifiedKFold refuses this; the rule is kept by hand.
    x, _ = _blobs(n=20, c=4)
    y = np.repeat(np.arange(4), 5)
    r = cross_val_head(x, y, n_classes=4, folds=10)
    assert sorted(set(r.fold.tolist())) == list(range(10))  # every fold holds an image out
    for c in range(4):
        assert len(set(r.fold[y == c].tolist())) == 5  # each class spread over as many folds as it has images
    assert np.isfinite(r.probs).all() and np.allclose(r.probs.sum(1), 1, atol=1e-4)


def test_left_out_rows_get_nan_and_fold_minus_one():
    x, y = _blobs(n=120)
    y = y.copy()
    y[:5] = -1
    x[5] = np.nan
    r = cross_val_head(x, y, n_classes=4, folds=3)
    assert np.isnan(r.logits[:6]).all() and (r.fold[:6] == -1).all()
    assert np.isfinite(r.logits[6:]).all()


def test_several_feature_sets_are_concatenated():
    x, y = _blobs(n=200, d=8)
    r = cross_val_head([x[:, :4], x[:, 4:]], y, n_classes=4, folds=4)
    assert r.params["features_dim"] == 8
    assert np.allclose(r.logits, cross_val_head(x, y, n_classes=4, folds=4).logits, atol=1e-4)


def test_softmax_head_reaches_sklearns_optimum_at_the_same_c():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(n=300, d=10, sep=1.0, seed=2)  # overlapping classes: the regulariser matters
    c = 0.05
    ours = cross_val_head(x, y, n_classes=4, folds=3, c_grid=(c,))
    xs = standardize(x, np.arange(300))
    ref = np.empty((300, 4))
    for k in range(3):
        te = ours.fold == k
        m = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(xs[~te], y[~te])
        ref[te] = m.predict_proba(xs[te])
    assert np.abs(ours.probs - ref).max() < 2e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "hinge"}, "kind is 'hinge'"),
        ({"folds": 1}, "expected ints >= 2"),
        ({"c_grid": (0.0,)}, "positive finite"),
        ({"c_grid": ()}, "positive finite"),
        ({"n_classes": 1}, "n_classes"),
    ],
)
def test_bad_options_say_what_was_expected(kwargs, message):
    x, y = _blobs(n=40)
    opts = {"n_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        cross_val_head(x, y, **opts)


def test_bad_arrays_say_what_was_expected():
    x, y = _blobs(n=40)
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        cross_val_head(x[0], y, n_classes=4)
    with pytest.raises(ValueError, match="same N"):
        cross_val_head([x, x[:10]], y, n_classes=4)
    with pytest.raises(ValueError, match="labels lie in"):
        cross_val_head(x, y + 10, n_classes=4)
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        cross_val_head(x, np.zeros(40, dtype=int), n_classes=4)
