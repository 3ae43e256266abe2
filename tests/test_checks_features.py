"""Feature-space checks (knn_label, label_knn, near_duplicate, outlier): seeded synthetic features, planted answers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.checks import CheckInputs, CheckRegistry
from audit.checks import _neighbors as nbmod
from audit.checks.duplicates import NearDuplicateCheck, duplicate_groups
from audit.checks.knn import WEIGHT_DEFAULT, KnnLabelCheck, LabelKnnCheck, combine_label_scores, knn_label_probs
from audit.checks.outlier import OutlierCheck
from audit.errors import OptionError

HAS_FAISS = importlib.util.find_spec("faiss") is not None
C = 4


@dataclass
class Planted:
    inputs: CheckInputs
    truth: np.ndarray  # (N,) cluster each image came from
    mislabelled: np.ndarray  # images inside one cluster labelled as another
    copies: list[tuple[int, int]]  # (original, near copy)
    conflict: tuple[int, int]  # a near copy with a different label than its original
    exact: tuple[int, int]  # an exact copy
    far: int  # an image far from everything


def _planted(seed: int = 0, per_class: int = 40, d: int = 64, **kw: object) -> Planted:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (C, 2 * d)) * 1.5
    truth = np.repeat(np.arange(C), per_class)
    x = centres[truth] + rng.normal(0, 1, (len(truth), 2 * d))
    labels = truth.copy()
    mis = np.array([3, 45, 90, 130])  # one per class, labelled as the next class
    labels[mis] = (truth[mis] + 1) % C
    rows = [x]
    copies = []
    n = len(x)
    for src in (5, 50, 100):  # near copies: the same point with a little noise
        rows.append(x[src] + rng.normal(0, 0.01, (1, 2 * d)))
        copies.append((src, n))
        labels = np.append(labels, labels[src])
        truth = np.append(truth, truth[src])
        n += 1
    conflict_src = 60
    rows.append(x[conflict_src] + rng.normal(0, 0.01, (1, 2 * d)))
    labels = np.append(labels, (labels[conflict_src] + 2) % C)
    truth = np.append(truth, truth[conflict_src])
    conflict = (conflict_src, n)
    n += 1
    rows.append(x[150:151].copy())  # an exact copy
    labels = np.append(labels, labels[150])
    truth = np.append(truth, truth[150])
    exact = (150, n)
    n += 1
    far_dir = rng.normal(0, 1, (1, 2 * d))
    rows.append(far_dir * 30)  # nowhere near any cluster
    labels = np.append(labels, 0)
    truth = np.append(truth, -1)
    far = n
    n += 1
    feats = np.concatenate(rows).astype(np.float32)
    # Two "models": the two halves of the vector, the second at another scale (normalisation must cancel it).
    f = [feats[:, :d].astype(np.float16), (feats[:, d:] * 50).astype(np.float32)]
    inputs = CheckInputs(
        n=n,
        labels=labels.astype(np.int64),
        n_classes=C,
        class_names=tuple("abcd"),
        valid=np.ones(n, dtype=bool),
        features=f,
        model_names=("m1", "m2"),
        **kw,  # type: ignore[arg-type]
    )
    return Planted(inputs, truth, mis, copies, conflict, exact, far)


def _with(inputs: CheckInputs, **changes: object) -> CheckInputs:
    fields = {k: getattr(inputs, k) for k in inputs.__dataclass_fields__}
    fields.update(changes)
    return CheckInputs(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- knn_label


def test_knn_label_finds_planted_mislabels_and_suggests_their_cluster() -> None:
    pl = _planted()
    res = KnnLabelCheck().run(pl.inputs)
    assert res.check == "knn_label"
    s = res.score
    assert np.all((s[np.isfinite(s)] >= 0) & (s[np.isfinite(s)] <= 1))
    # The lowest scores: the planted mislabels and the near copy given another label than its twin's.
    worst = np.argsort(s)[: len(pl.mislabelled) + 1]
    assert set(worst) == {*pl.mislabelled, pl.conflict[1]}
    assert res.is_issue[pl.mislabelled].all()
    np.testing.assert_array_equal(res.suggestion[pl.mislabelled], pl.truth[pl.mislabelled])
    # Correctly labelled images inside their cluster are not flagged.
    clean = np.setdiff1d(np.arange(160), [*pl.mislabelled, *(c[0] for c in pl.copies), pl.conflict[0]])
    assert res.is_issue[clean].mean() < 0.05
    info = res.info[pl.mislabelled[0]]
    assert info is not None and len(info["neighbours"]) == 5 and info["agree"] < 0.5
    assert res.summary["assessed"] == pl.inputs.n


def test_knn_label_flags_nothing_when_classes_are_too_small_for_a_vote() -> None:
    # 100 classes of 2 images each (the shared ImageNet 1,300 has a median of 2): a neighbour vote cannot agree.
    rng = np.random.default_rng(3)
    n, classes = 200, 100
    feats = rng.normal(0, 1, (n, 32)).astype(np.float32)
    labels = np.repeat(np.arange(classes), 2)
    inputs = CheckInputs(n=n, labels=labels, n_classes=classes, features=[feats], model_names=("m",))
    res = KnnLabelCheck().run(inputs)
    assert not res.is_issue.any() and np.isfinite(res.score).all()  # scores kept, nothing flagged
    assert res.summary["median_images_per_class"] == 2.0 and "too few" in res.summary["note"]
    assert KnnLabelCheck(min_per_class=0).run(inputs).is_issue.any()  # the rule off: the vote flags many
    pl = _planted()  # 40 a class: the rule does not apply
    assert "note" not in KnnLabelCheck().run(pl.inputs).summary
    with pytest.raises(OptionError, match="min_per_class"):
        KnnLabelCheck(min_per_class=-1)


def test_knn_label_nan_for_invalid_unlabelled_and_nonfinite_rows() -> None:
    pl = _planted()
    valid = np.ones(pl.inputs.n, dtype=bool)
    valid[7] = False
    labels = pl.inputs.labels.copy()
    labels[8] = -1
    f0 = pl.inputs.features[0].copy()
    f0[9] = np.nan
    f1 = pl.inputs.features[1].copy()
    f1[10] = 0.0  # zero-length features: no direction to compare
    inp = _with(pl.inputs, valid=valid, labels=labels, features=[f0, f1])
    res = KnnLabelCheck().run(inp)
    for i in (7, 8, 9, 10):
        assert np.isnan(res.score[i]) and not res.is_issue[i] and res.suggestion[i] == -1 and res.info[i] is None
    assert np.isfinite(np.delete(res.score, [7, 8, 9, 10])).all()


def test_knn_label_is_deterministic_and_backend_independent() -> None:
    a = KnnLabelCheck().run(_planted().inputs)
    b = KnnLabelCheck(backend="sklearn").run(_planted().inputs)
    np.testing.assert_allclose(a.score, b.score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.is_issue, b.is_issue)
    np.testing.assert_array_equal(a.suggestion, b.suggestion)
    for check in (NearDuplicateCheck(), OutlierCheck()):
        x, y = check.run(_planted().inputs), check.run(_planted().inputs)
        np.testing.assert_array_equal(x.score, y.score)
        np.testing.assert_array_equal(x.is_issue, y.is_issue)
        assert x.info == y.info and x.summary == y.summary


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_and_sklearn_agree() -> None:
    a = KnnLabelCheck(backend="faiss").run(_planted().inputs)
    b = KnnLabelCheck(backend="sklearn").run(_planted().inputs)
    np.testing.assert_allclose(a.score, b.score, atol=1e-6)
    np.testing.assert_array_equal(a.suggestion, b.suggestion)
    pl = _planted()
    ref = {"image_ids": [str(i) for i in range(pl.inputs.n)], "features": pl.inputs.features}
    for be in ("faiss", "sklearn"):
        r = NearDuplicateCheck(backend=be).run(_with(pl.inputs, reference=ref))
        assert r.summary["duplicates_of_reference"] == pl.inputs.n  # every image is its own reference copy


def test_an_unavailable_backend_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_faiss(name: str, *a: object, **kw: object):  # type: ignore[no-untyped-def]
        if name == "faiss":
            raise ImportError(name)
        return real(name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    assert nbmod.resolve_backend("auto") == "sklearn"
    with pytest.raises(OptionError, match="pip install faiss-cpu"):
        nbmod.resolve_backend("faiss")


def test_reduced_search_reranks_to_the_exact_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    exact = nbmod.neighbors(_planted().inputs, reduce_to=None)
    monkeypatch.setattr(nbmod, "_EXACT_FLOPS", 0.0)  # force the projection even on a small set
    red = nbmod.neighbors(_planted().inputs, reduce_to=40)
    assert red.params["reduced_to"] == 40 and exact.params["reduced_to"] is None
    # Similarities are exact (recomputed in the full space); neighbours agree almost everywhere
    # (isotropic noise is the projection's worst case: no direction carries the neighbours).
    recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(red.idx, exact.idx, strict=True)])
    assert recall > 0.9
    hit = red.idx == exact.idx
    np.testing.assert_allclose(red.sim[hit], exact.sim[hit], atol=1e-6)


def test_exact_copies_vote_once() -> None:
    # p labelled 0 in cluster 0; five exact copies of its nearest neighbour labelled 1.
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, (30, 8)) + np.array([4.0] + [0] * 7)
    q = base[0] + 0.05
    feats = np.concatenate([base, np.repeat(q[None], 5, 0)]).astype(np.float32)
    labels = np.array([0] * 30 + [1] * 5)
    inp = CheckInputs(n=35, labels=labels, n_classes=2, features=[feats], model_names=("m",))
    nb = nbmod.neighbors(inp, k=10)
    assert nb.space.n_groups == 31  # the five copies are one node
    rows, _probs, votes = knn_label_probs(nb, labels, 2)
    i = int(np.flatnonzero(rows == 0)[0])
    assert votes[i, 1] <= 1.0 + 1e-9  # one vote's worth, not five
    assert votes[i, 0] > 5 * votes[i, 1]
    # A copy sees its four twins (label 1) as one vote at similarity 1 plus its neighbours.
    j = int(np.flatnonzero(rows == 30)[0])
    assert votes[j, 1] == pytest.approx(1.0)


def test_exact_copy_with_another_label_is_evidence() -> None:
    pl = _planted()
    labels = pl.inputs.labels.copy()
    a, b = pl.exact
    labels[b] = (labels[a] + 1) % C
    res = KnnLabelCheck().run(_with(pl.inputs, labels=labels))
    base = KnnLabelCheck().run(pl.inputs)
    assert res.score[a] < base.score[a]


def test_knn_options_are_validated() -> None:
    for bad in ({"k": 0}, {"k": 2.5}, {"weights": "x"}, {"alpha": -1}, {"method": "x"}, {"backend": "x"}, {"zz": 1}):
        with pytest.raises(OptionError):
            KnnLabelCheck(**bad)
    with pytest.raises(OptionError, match="m1, m2"):
        KnnLabelCheck(model="nope").run(_planted().inputs)


def test_one_model_can_be_chosen() -> None:
    pl = _planted()
    res = KnnLabelCheck(model="m2").run(pl.inputs)
    assert res.summary["graph_models"] == ["m2"]
    assert res.is_issue[pl.mislabelled].all()
    assert KnnLabelCheck().run(pl.inputs).summary["graph_models"] == ["m1", "m2"]


def test_the_graph_is_built_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = nbmod.knn_search

    def spy(*a: object, **kw: object):  # type: ignore[no-untyped-def]
        calls.append(a[2])
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(nbmod, "knn_search", spy)
    inp = _planted().inputs
    KnnLabelCheck().run(inp)
    NearDuplicateCheck().run(inp)
    OutlierCheck(k=5).run(inp)
    assert calls == [nbmod.GRAPH_K]  # one search, at least GRAPH_K deep, serves k = 20, 10 and 5
    KnnLabelCheck(k=30).run(inp)  # a larger k rebuilds once
    KnnLabelCheck(k=25).run(inp)
    assert calls == [nbmod.GRAPH_K, 30]


# --------------------------------------------------------------------------- label_knn


def _probs_for(pl: Planted, seed: int = 0) -> list[np.ndarray]:
    """Probabilities that know the true cluster (so they disagree with the mislabels), one noisy model."""
    rng = np.random.default_rng(seed)
    n = pl.inputs.n
    t = np.where(pl.truth >= 0, pl.truth, 0)
    logits = rng.normal(0, 1, (n, C))
    logits[np.arange(n), t] += 3.0
    logits[pl.far] = 0.0  # no class fits
    e = np.exp(logits - logits.max(1, keepdims=True))
    return [(e / e.sum(1, keepdims=True)).astype(np.float32)]


def test_label_knn_combines_and_keeps_the_label_checks_count() -> None:
    from audit.flag import find_label_issues

    pl = _planted()
    probs = _probs_for(pl)
    inp = _with(pl.inputs, probs=probs, model_names=("m1", "m2"))
    res = LabelKnnCheck().run(inp)
    frame = find_label_issues(probs, inp.labels, valid=inp.valid)
    assert res.is_issue.sum() == frame["is_label_issue"].sum()
    knn = KnnLabelCheck().run(inp).score
    w = WEIGHT_DEFAULT
    np.testing.assert_allclose(res.score, (1 - w) * frame["label_quality"].to_numpy() + w * knn)
    assert res.is_issue[pl.mislabelled].all()
    with pytest.raises(OptionError):
        LabelKnnCheck(how="nope")
    with pytest.raises(OptionError):
        LabelKnnCheck(weight=2)


def test_label_knn_uses_the_label_checks_result_of_the_run() -> None:
    from audit.checks import CheckResult, _memo
    from audit.checks.knn import result_key

    pl = _planted()
    inp = _with(pl.inputs, probs=_probs_for(pl), model_names=("m1", "m2"))
    n = inp.n
    fake = CheckResult(
        check="label",
        score=np.linspace(0, 1, n),
        is_issue=np.arange(n) < 7,
        suggestion=np.full(n, 2, dtype=np.int64),
    )
    _memo.store(inp, result_key("label"), fake)
    res = LabelKnnCheck(weight=0.0).run(inp)  # weight 0: the label score alone
    assert res.summary["label_scores_from"] == "label check"
    np.testing.assert_allclose(res.score, fake.score)
    np.testing.assert_array_equal(np.flatnonzero(res.is_issue), np.arange(7))
    assert (res.suggestion == 2).all()


def test_combine_label_scores() -> None:
    a = np.array([0.2, 0.8, np.nan, np.nan])
    b = np.array([0.6, 0.4, 0.3, np.nan])
    np.testing.assert_allclose(combine_label_scores(a, b, weight=0.5)[:3], [0.4, 0.6, 0.3])
    np.testing.assert_allclose(combine_label_scores(a, b, weight=0.25)[:2], [0.3, 0.7])
    assert np.isnan(combine_label_scores(a, b)[3])
    np.testing.assert_allclose(combine_label_scores(a, b, how="min")[:3], [0.2, 0.4, 0.3])
    np.testing.assert_allclose(combine_label_scores(a, b, how="product", weight=0.5)[:2], np.sqrt([0.12, 0.32]))


# --------------------------------------------------------------------------- near_duplicate


def test_near_duplicates_are_grouped_with_label_conflicts_counted() -> None:
    pl = _planted()
    res = NearDuplicateCheck().run(pl.inputs)
    pairs = [*pl.copies, pl.conflict, pl.exact]
    groups = set()
    for a, b in pairs:
        assert res.is_issue[a] and res.is_issue[b]
        ga, gb = res.info[a]["group"], res.info[b]["group"]
        assert ga == gb
        groups.add(ga)
        assert res.suggestion[a] == b and res.suggestion[b] == a
        assert b in res.info[a]["partners"]
    assert len(groups) == len(pairs)
    assert res.summary["duplicate_groups"] == len(pairs)
    assert res.summary["images_in_groups"] == 2 * len(pairs) == res.is_issue.sum()
    assert res.summary["groups_with_different_labels"] == 1
    assert res.info[pl.conflict[1]]["labels_differ"] and not res.info[pl.copies[0][1]]["labels_differ"]
    assert res.summary["exact_duplicate_groups"] == 1
    assert res.score[pl.exact[0]] == 0.0 and res.score[pl.exact[1]] == 0.0
    dup = np.zeros(pl.inputs.n, dtype=bool)
    dup[[i for p in pairs for i in p]] = True
    assert res.score[dup].max() < np.nanmin(res.score[~dup])  # duplicates rank first


def test_near_duplicate_relative_rule_and_options() -> None:
    res = NearDuplicateCheck(relative=0.13).run(_planted().inputs)
    assert "Datalab" in res.summary["threshold_rule"]
    assert res.summary["threshold"] == pytest.approx(1 - 0.13 * (1 - res.summary["median_nn_similarity"]), abs=1e-5)
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"relative": 1.0}, {"nope": 1}):
        with pytest.raises(OptionError):
            NearDuplicateCheck(**bad)


def test_reference_duplicates_are_leakage_and_the_reference_is_not_scored() -> None:
    pl = _planted()
    f = pl.inputs.features
    rng = np.random.default_rng(9)
    # The reference: 20 unrelated points plus a near copy of image 12.
    ref = [np.concatenate([rng.normal(0, 1, (20, a.shape[1])), a[12:13].astype(np.float32) * 1.0001]) for a in f]
    ids = [f"train/{i}.jpg" for i in range(21)]
    inp = _with(pl.inputs, reference={"image_ids": ids, "features": ref})
    res = NearDuplicateCheck().run(inp)
    assert len(res.score) == pl.inputs.n  # one row per image of the set, none for the reference
    assert res.is_issue[12] and res.info[12]["reference"] == "train/20.jpg"
    assert res.summary["duplicates_of_reference"] == 1
    assert "group" not in res.info[12]  # a leak, not a duplicate within the set
    with pytest.raises(OptionError):
        NearDuplicateCheck().run(_with(pl.inputs, reference={"image_ids": ids, "features": ref[:1]}))


def test_duplicate_groups_are_components_numbered_by_lowest_member() -> None:
    g = duplicate_groups(np.array([[5, 3], [3, 4], [1, 0]]), 7)
    np.testing.assert_array_equal(g, [0, 0, -1, 1, 1, 1, -1])
    np.testing.assert_array_equal(duplicate_groups(np.zeros((0, 2), dtype=np.int64), 3), [-1, -1, -1])


# --------------------------------------------------------------------------- outlier


def test_far_point_is_the_outlier_in_features_probs_and_both() -> None:
    pl = _planted()
    feats = OutlierCheck().run(pl.inputs)
    assert feats.summary["inputs_used"] == ["features"]
    assert int(np.nanargmin(feats.score)) == pl.far and feats.is_issue[pl.far]
    assert feats.is_issue.sum() <= 0.05 * pl.inputs.n

    probs = _probs_for(pl)
    only_probs = _with(pl.inputs, features=None, probs=probs)
    chk = OutlierCheck()
    assert chk.missing(only_probs) == frozenset()
    pr = chk.run(only_probs)
    assert pr.summary["inputs_used"] == ["probs"] and pr.summary["probs_adjusted_by_class_thresholds"]
    assert int(np.nanargmin(pr.score)) == pl.far and pr.is_issue[pl.far]

    both = OutlierCheck().run(_with(pl.inputs, probs=probs))
    assert both.summary["inputs_used"] == ["features", "probs"]
    np.testing.assert_allclose(both.score, np.sqrt(feats.score * pr.score))
    assert both.is_issue[pl.far] and set(both.info[pl.far]["by"]) == {"features", "probs"}
    np.testing.assert_array_equal(both.is_issue, feats.is_issue | pr.is_issue)


def test_outlier_needs_features_or_probs() -> None:
    pl = _planted()
    none = _with(pl.inputs, features=None)
    assert OutlierCheck().missing(none) == frozenset({"features", "probs"})
    assert OutlierCheck(use="probs").missing(pl.inputs) == frozenset({"probs"})
    assert OutlierCheck().missing(pl.inputs) == frozenset()
    nolabels = _with(pl.inputs, features=None, labels=None, probs=_probs_for(pl))
    res = OutlierCheck().run(nolabels)
    assert not res.summary["probs_adjusted_by_class_thresholds"] and res.is_issue[pl.far]


def test_outlier_absent_class_keeps_a_finite_score() -> None:
    pl = _planted()
    labels = pl.inputs.labels.copy()
    labels[labels == 3] = 2  # class 3 is never given
    res = OutlierCheck(use="probs").run(_with(pl.inputs, labels=labels, probs=_probs_for(pl)))
    assert np.isfinite(res.score).all()


@pytest.mark.parametrize("block", [7, 4096])
def test_outlier_probs_in_blocks_equal_cleanlab_on_the_full_matrix(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """The block-wise probability half gives cleanlab's scores on the full (N, C) mean, absent classes included."""
    from cleanlab.count import get_confident_thresholds
    from cleanlab.outlier import OutOfDistribution

    import audit.checks.outlier as om

    monkeypatch.setattr(om, "_BLOCK", block)
    pl = _planted()
    labels = pl.inputs.labels.copy()
    labels[labels == 3] = 2  # an absent class takes the mean self-confidence
    labels[:5] = -1  # unlabelled rows are scored but fit nothing
    probs = _probs_for(pl)
    probs = [probs[0], np.roll(probs[0], 1, axis=1)]  # two models: their mean is what is scored
    valid = np.ones(pl.inputs.n, dtype=bool)
    valid[7] = False
    res = OutlierCheck(use="probs").run(_with(pl.inputs, labels=labels, probs=probs, valid=valid))

    mean = (probs[0].astype(np.float64) + probs[1]) / 2
    mean /= mean.sum(1, keepdims=True)
    rows = np.flatnonzero(valid)
    lab = labels[rows]
    keep = lab >= 0
    thr = np.asarray(get_confident_thresholds(lab[keep], mean[rows][keep]), dtype=np.float64)
    absent = np.bincount(lab[keep], minlength=mean.shape[1]) == 0
    thr[absent] = mean[rows][keep][np.arange(keep.sum()), lab[keep]].mean()
    want = OutOfDistribution(params={"method": "entropy", "confident_thresholds": thr}).score(pred_probs=mean[rows])
    np.testing.assert_allclose(res.score[rows], np.clip(want, 0, 1), rtol=1e-12, atol=1e-12)
    assert np.isnan(res.score[7])


# --------------------------------------------------------------------------- the contract, for any input


def test_the_checks_register_and_declare_known_inputs() -> None:
    reg = CheckRegistry()
    for cls in (KnnLabelCheck, LabelKnnCheck, NearDuplicateCheck, OutlierCheck):
        reg.register(cls)
    assert reg.names() == ["knn_label", "label_knn", "near_duplicate", "outlier"]
    pl = _planted()
    assert KnnLabelCheck().missing(_with(pl.inputs, features=None)) == frozenset({"features"})
    assert LabelKnnCheck().missing(pl.inputs) == frozenset({"probs"})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    d=st.integers(1, 6),
    n_classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    dup=st.booleans(),
)
def test_scores_lie_in_0_1_or_nan_for_any_input(n: int, d: int, n_classes: int, seed: int, dup: bool) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d)).astype(np.float32)
    if dup and n > 2:
        x[1] = x[0]
        x[2] = 0.0
    labels = rng.integers(-1, n_classes, n)
    valid = rng.random(n) > 0.1
    p = rng.dirichlet(np.ones(n_classes), n).astype(np.float32)
    inp = CheckInputs(n=n, labels=labels, n_classes=n_classes, valid=valid, features=[x], probs=[p], model_names=("m",))
    for check in (KnnLabelCheck(k=3), NearDuplicateCheck(k=3), OutlierCheck(k=3), LabelKnnCheck(k=3)):
        res = check.run(inp)  # CheckResult validates the range itself
        assert res.score.shape == (n,) and res.is_issue.dtype == bool
        assert not res.is_issue[~np.isfinite(res.score)].any()
        if check.name != "outlier":
            assert np.isnan(res.score[~valid]).all()
        assert (res.suggestion is None) or (res.suggestion[~valid] == -1).all() or check.name == "label_knn"


# --------------------------------------------------------------------------- near_duplicate: perceptual hashes


def _flip(h: int, bits: int, rng: np.random.Generator) -> int:
    """``h`` with ``bits`` distinct bits flipped: a hash exactly ``bits`` away."""
    for b in rng.choice(64, bits, replace=False):
        h ^= 1 << int(b)
    return h


def _pixels(n: int, seed: int = 0, near: dict[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Decode-pass columns with random phashes; ``near[j] = (i, bits)`` puts image j's hash ``bits`` from i's."""
    rng = np.random.default_rng(seed)
    ph = [int(x) for x in rng.integers(0, 2**63, n, dtype=np.uint64) * 2 + rng.integers(0, 2, n, dtype=np.uint64)]
    for j, (i, bits) in (near or {}).items():
        ph[j] = _flip(ph[i], bits, rng)
    return {"ok": np.ones(n, dtype=bool), "phash": np.array(ph, dtype=np.uint64)}


def test_either_signal_joins_a_pair_and_info_says_which() -> None:
    pl = _planted()
    n = pl.inputs.n
    fsrc, fcopy = pl.copies[0]  # near copies in feature space whose hashes stay unrelated (~32 bits apart)
    # 20 and 21: two different points of one cluster (cosine ~0.7), but their phashes 3 bits apart;
    # the conflict pair: near copies in both.
    px = _pixels(n, near={21: (20, 3), pl.conflict[1]: (pl.conflict[0], 0)})
    res = NearDuplicateCheck().run(_with(pl.inputs, pixels=px))
    assert res.summary["inputs_used"] == ["features", "pixels"]
    assert res.info[20]["group"] == res.info[21]["group"] and res.suggestion[20] == 21 and res.suggestion[21] == 20
    assert res.info[20]["by"] == ["phash"] and res.info[20]["hash_distance"] == 3
    assert res.info[20]["similarity"] < 0.9  # the features alone would not have joined them
    assert res.score[20] == pytest.approx(3 / 64)
    assert res.info[fsrc]["by"] == ["features"] and res.info[fsrc]["hash_distance"] > 10  # the distance, known
    assert res.info[pl.conflict[0]]["by"] == ["features", "phash"] and res.info[pl.conflict[0]]["hash_distance"] == 0
    assert res.info[pl.conflict[0]]["labels_differ"]
    assert res.summary["joined_by"] == {"features_only": 8, "phash_only": 2, "both": 2}
    # The features' findings are unchanged by the hash half.
    plain = NearDuplicateCheck().run(pl.inputs)
    both = res.is_issue.copy()
    both[[20, 21]] = False
    np.testing.assert_array_equal(both, plain.is_issue)
    assert "hash_distance" not in plain.info[fcopy] and plain.info[fcopy]["by"] == ["features"]
    # A smaller distance, or the hash turned off, leaves 20 and 21 apart.
    for off in ({"hash_distance": 2}, {"hash_distance": -1}, {"hash_distance": None}):
        r = NearDuplicateCheck(**off).run(_with(pl.inputs, pixels=px))
        assert not r.is_issue[20] and not r.is_issue[21], off
    assert NearDuplicateCheck(hash_distance=-1).run(_with(pl.inputs, pixels=px)).summary["inputs_used"] == ["features"]


def test_pixels_only_groups_by_hash_and_scores_the_distance() -> None:
    n = 30
    px = _pixels(n, near={1: (0, 0), 2: (0, 0), 4: (3, 4), 6: (5, 5), 8: (7, 0)})
    px["ok"][8] = False  # unreadable: its fill hash must join nothing
    labels = np.zeros(n, dtype=np.int64)
    labels[2] = 1
    valid = np.ones(n, dtype=bool)
    valid[9] = False
    inp = CheckInputs(n=n, labels=labels, n_classes=2, valid=valid, pixels=px)
    chk = NearDuplicateCheck()
    assert chk.missing(inp) == frozenset()
    res = chk.run(inp)
    assert res.summary["inputs_used"] == ["pixels"] and "threshold" not in res.summary
    g = res.info[0]["group"]
    assert res.info[1]["group"] == res.info[2]["group"] == g and res.info[0]["size"] == 3
    assert res.info[0]["partners"] == [1, 2] and res.suggestion[0] == 1 and res.suggestion[2] == 0
    assert res.info[0]["labels_differ"] and res.info[0]["by"] == ["phash"] and "similarity" not in res.info[0]
    assert res.is_issue[3] and res.is_issue[4] and res.info[3]["hash_distance"] == 4
    assert not res.is_issue[5] and not res.is_issue[6]  # 5 bits: beyond the default 4
    assert not res.is_issue[7] and not res.is_issue[8]
    assert np.isnan(res.score[[8, 9]]).all()
    np.testing.assert_allclose(res.score[[0, 1, 2, 3, 4]], [0, 0, 0, 4 / 64, 4 / 64])
    assert res.score[5] == 1.0 and res.summary["duplicate_groups"] == 2
    assert res.summary["groups_with_different_labels"] == 1
    assert NearDuplicateCheck(hash_distance=0).run(inp).is_issue.sum() == 3  # CleanVision's rule: equal hashes
    # Needs either input; the note says so when neither is there.
    from audit.checks import skip_note

    none = CheckInputs(n=n, labels=labels)
    assert chk.missing(none) == frozenset({"features", "pixels"})
    assert skip_note(chk, chk.missing(none)).startswith("skipped: needs features or pixels, which this run lacks")
    assert NearDuplicateCheck(hash_distance=-1).missing(inp) == frozenset({"features"})
    assert chk.missing(CheckInputs(n=n, pixels={"ok": px["ok"]})) == frozenset({"features", "pixels"})  # no phash


@pytest.mark.parametrize("bad", [11, -2, 2.5, "4", True, [1]])
def test_hash_distance_must_be_an_int_in_range_or_off(bad: object) -> None:
    with pytest.raises(OptionError, match=r"hash_distance must be an int in 0\.\.10"):
        NearDuplicateCheck(hash_distance=bad)


def test_hash_distance_off_and_bounds_are_accepted() -> None:
    assert NearDuplicateCheck(hash_distance=-1).params["hash_distance"] is None
    assert NearDuplicateCheck(hash_distance=None).params["hash_distance"] is None
    assert NearDuplicateCheck(hash_distance=np.int64(0)).params["hash_distance"] == 0
    assert NearDuplicateCheck().params["hash_distance"] == 4


def test_hamming_pairs_match_brute_force_on_biased_hashes() -> None:
    from audit.checks._hashes import hamming_pairs

    rng = np.random.default_rng(3)
    m = 600
    bias = np.r_[np.full(40, 0.5), np.full(20, 0.9), np.ones(4)]  # phash-like: some bits rarely change
    bits = rng.random((m, 64)) < bias
    h = np.unique((bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(1, dtype=np.uint64))
    side = rng.random(len(h)) < 0.3
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    iu, ju = np.triu_indices(len(h), 1)
    for d in (0, 2, 5, 10):
        i, j, dd = hamming_pairs(h, d)
        want = dist[iu, ju] <= d
        np.testing.assert_array_equal(i, iu[want])
        np.testing.assert_array_equal(j, ju[want])
        np.testing.assert_array_equal(dd, dist[iu, ju][want])
        i, j, _ = hamming_pairs(h, d, side)
        cross = want & (side[iu] != side[ju])
        np.testing.assert_array_equal(np.c_[i, j], np.c_[iu[cross], ju[cross]])


def test_hash_pairing_at_50k_images_is_fast_and_exact() -> None:
    import time

    n = 50_000
    rng = np.random.default_rng(7)
    src = rng.choice(n, 1_000, replace=False)
    dst = rng.permutation(np.setdiff1d(np.arange(n), src))[:1_000]
    near = {int(j): (int(i), int(rng.integers(0, 5))) for i, j in zip(src, dst, strict=True)}
    px = _pixels(n, seed=7, near=near)
    inp = CheckInputs(n=n, pixels=px)
    t0 = time.perf_counter()
    res = NearDuplicateCheck().run(inp)
    seconds = time.perf_counter() - t0
    assert seconds < 5.0, seconds  # ~0.3 s measured on two busy cores; an all-pairs loop would take minutes
    assert res.is_issue[src].all() and res.is_issue[dst].all()
    assert res.is_issue.sum() == 2_000 and res.summary["duplicate_groups"] == 1_000  # random hashes never meet
    np.testing.assert_array_equal(res.suggestion[dst], src)


def test_reference_leakage_by_hash() -> None:
    pl = _planted()
    n = pl.inputs.n
    px = _pixels(n, seed=1)
    rpx = _pixels(21, seed=2)
    rpx["phash"][20] = np.uint64(_flip(int(px["phash"][12]), 2, np.random.default_rng(0)))  # 2 bits from image 12
    rpx["phash"][19] = px["phash"][30]  # identical to image 30's, but unreadable: no leak
    rpx["ok"][19] = False
    ids = [f"train/{i}.jpg" for i in range(21)]
    ref_labels = np.arange(21) % C
    reference = {"image_ids": ids, "pixels": rpx, "labels": ref_labels, "features": None}
    # The set with pixel statistics only, and with features too (the reference has no features: hash only).
    for inp in (_with(pl.inputs, features=None, pixels=px, reference=reference), _with(pl.inputs, pixels=px,
                                                                                         reference=reference)):
        res = NearDuplicateCheck().run(inp)
        assert len(res.score) == n
        assert res.is_issue[12] and res.info[12]["reference"] == "train/20.jpg"
        assert res.info[12]["reference_by"] == ["phash"] and res.info[12]["reference_hash_distance"] == 2
        assert res.info[12]["reference_label"] == ref_labels[20] and "group" not in res.info[12]
        assert res.score[12] <= 2 / 64 and not res.is_issue[30]
        assert res.summary["duplicates_of_reference"] == 1 and res.summary["reference_images"] == 21
    # Features and hashes both: the feature leak names its image, the hash one its own where it differs.
    f = pl.inputs.features
    rng = np.random.default_rng(9)
    ref_f = [np.concatenate([rng.normal(0, 1, (20, a.shape[1])), a[12:13].astype(np.float32) * 1.0001]) for a in f]
    rpx["phash"][5] = px["phash"][12]
    res = NearDuplicateCheck().run(_with(pl.inputs, pixels=px, reference={**reference, "features": ref_f}))
    e = res.info[12]
    assert e["reference"] == "train/20.jpg" and e["reference_by"] == ["features", "phash"]
    assert e["reference_hash_distance"] == 0 and e["reference_phash"] == "train/5.jpg"
    assert res.summary["duplicates_of_reference_by"] == {"features_only": 0, "phash_only": 0, "both": 1}
    # Neither part comparable: said, not guessed.
    res = NearDuplicateCheck().run(_with(pl.inputs, reference={"image_ids": ids, "pixels": rpx}))
    assert "leakage not checked" in res.summary["reference_note"] and not res.is_issue[12]
