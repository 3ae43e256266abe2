"""End to end on synthetic data: run -> metrics -> issues -> decisions -> export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _synth import make_imagefolder, make_predictions

from audit import queries as q
from audit.datasets import load_dataset
from audit.export import export_labels
from audit.pipeline import ENSEMBLE, run_audit, topk_of
from audit.store import append_decision, connect
from audit.zoo import resolve_model


@pytest.fixture
def workspace(tmp_path: Path):
    root = make_imagefolder(tmp_path / "ds")
    ds = load_dataset(root)
    flip = np.array([1, 7, 13])
    a = make_predictions(tmp_path / "a.npy", list(ds.image_ids), ds.labels, flip=flip, seed=1)
    b = make_predictions(tmp_path / "b.npy", list(ds.image_ids), ds.labels, flip=flip, seed=2, probs=True)
    db = tmp_path / "w.duckdb"
    res = run_audit(ds, [resolve_model(f"preds:{a}"), resolve_model(f"preds:{b}")], db, progress=False)
    return ds, db, res, flip


def _metric(df, model, evaluation, metric):
    row = df[(df.model == model) & (df.evaluation == evaluation) & (df.metric == metric)]
    assert len(row) == 1, (model, evaluation, metric)
    return row.iloc[0]


def test_run_writes_every_table(workspace):
    ds, db, _res, flip = workspace
    n = len(ds)
    with connect(db, read_only=True) as con:
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("images", "classes", "models", "predictions", "label_issues", "runs")
        }
        status = con.execute("SELECT status FROM runs").fetchall()[0][0]
    assert counts == {"images": n, "classes": 1000, "models": 2, "predictions": 3 * n, "label_issues": n, "runs": 1}
    assert status == "finished"
    m = q.metrics_table(db)
    top1 = _metric(m, ENSEMBLE, "original", "top1")
    assert top1.value == pytest.approx((n - len(flip)) / n)
    assert top1.low <= top1.value <= top1.high and top1.n == n
    assert set(m.evaluation) == {"original", "real", "sigmoid", "clean", "relabeled"}


def test_flipped_labels_are_flagged_worst_first(workspace):
    ds, db, res, flip = workspace
    with connect(db, read_only=True) as con:
        flagged = [
            r[0]
            for r in con.execute(
                "SELECT image_index FROM label_issues WHERE is_label_issue ORDER BY label_quality"
            ).fetchall()
        ]
        sugg = dict(con.execute("SELECT image_index, suggested_label FROM label_issues").fetchall())
    assert set(flagged[: len(flip)]) == set(flip.tolist())
    for i in flip:
        assert sugg[int(i)] == (ds.labels[i] + 1) % 1000
    assert res.n_flagged == len(flagged)


def test_decision_moves_relabeled_metric_and_export(workspace, tmp_path):
    ds, db, _res, flip = workspace
    before = _metric(q.metrics_table(db), ENSEMBLE, "relabeled", "top1").value
    for i in flip:
        append_decision(db, int(i), "accept", labels=[int((ds.labels[i] + 1) % 1000)], reviewer="t")
    after = _metric(q.metrics_table(db), ENSEMBLE, "relabeled", "top1").value
    assert before == pytest.approx((len(ds) - 3) / len(ds)) and after == pytest.approx(1.0)
    out1 = export_labels(db, tmp_path / "e1")
    export_labels(db, tmp_path / "e2")
    assert out1.n_changed == 3
    for f in out1.files:
        assert (tmp_path / "e1" / f).read_bytes() == (tmp_path / "e2" / f).read_bytes()
    lines = (tmp_path / "e1" / "labels.csv").read_text().splitlines()
    assert lines[0] == "image,label,labels,status,source"
    changed = [ln for ln in lines if ",relabeled," in ln]
    assert len(changed) == 3


def test_rerun_resumes_and_refuses_other_dataset(workspace, tmp_path):
    _ds, db, _res, _ = workspace
    other = load_dataset(make_imagefolder(tmp_path / "other", per_class=2, seed=5))
    from audit.errors import StoreError

    with pytest.raises(StoreError, match="other images"):
        run_audit(other, [resolve_model(f"preds:{tmp_path / 'a.npy'}")], db, progress=False)


def test_topk_of_handles_nan_rows():
    p = np.array([[0.1, 0.7, 0.2], [np.nan, np.nan, np.nan]], dtype=np.float32)
    cls, val = topk_of(p, 2)
    assert cls.tolist() == [[1, 2], [-1, -1]]
    assert val[0].tolist() == pytest.approx([0.7, 0.2]) and np.isnan(val[1]).all()


def test_ensemble_sigmoid_scores_are_the_mean_of_the_models_sigmoids(workspace):
    from audit.pipeline import _sigmoid_scores

    _, db, _, _ = workspace
    m = q.metrics_table(db)
    f1 = _metric(m, ENSEMBLE, "sigmoid", "f1")
    assert 0 <= f1.value <= 1 and f1.n == _metric(m, "preds:a", "sigmoid", "f1").n
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 30, (5, 7)).astype(np.float32), rng.normal(0, 3, (5, 7)).astype(np.float32)
    a[0, 0] = np.nan  # an unscored cell counts as logit 0
    got = _sigmoid_scores([a, b])
    want = (1 / (1 + np.exp(-np.nan_to_num(a.astype(np.float64)))) + 1 / (1 + np.exp(-b.astype(np.float64)))) / 2
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(_sigmoid_scores([b]), 1 / (1 + np.exp(-b.astype(np.float64))), atol=1e-6)


# --------------------------------------------------------------------------- issue 9: runs always end, options first


def _statuses(db: Path) -> list[tuple[str, str | None]]:
    import json

    with connect(db, read_only=True) as con:
        rows = con.execute("SELECT status, params FROM runs ORDER BY started_at").fetchall()
    return [(s, json.loads(p).get("error")) for s, p in rows]


@pytest.mark.parametrize(
    ("fault", "status"), [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")]
)
def test_a_run_that_raises_is_never_left_running(workspace, monkeypatch, fault, status):
    from audit import flag

    ds, db, _, _ = workspace

    def explode(*a, **k):
        raise fault

    monkeypatch.setattr(flag, "find_label_issues", explode)
    specs = [resolve_model(f"preds:{db.parent / 'a.npy'}")]
    with pytest.raises(type(fault)):
        run_audit(ds, specs, db, progress=False)
    (first, _), (last, error) = _statuses(db)
    assert first == "finished" and last == status and error.startswith(type(fault).__name__)
    monkeypatch.undo()
    run_audit(ds, specs, db, progress=False)  # the workspace still takes runs
    assert [s for s, _ in _statuses(db)] == ["finished", status, "finished"]


def test_no_model_for_a_custom_label_space_finishes_with_a_note(tmp_path):
    root = make_imagefolder(tmp_path / "custom", per_class=3, wnids=("cat", "dog"))
    ds = load_dataset(root)
    preds = make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels)  # 1,000 ImageNet classes
    db = tmp_path / "w.duckdb"
    res = run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    assert any("no model predicts this dataset's 2 classes" in n for n in res.skipped)
    assert res.metrics.empty and res.n_flagged == 0
    assert [s for s, _ in _statuses(db)] == ["finished"]
    assert q.metrics_table(db).empty
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM predictions").fetchall() == [(len(ds),)]
        assert con.execute("SELECT count(*) FROM metrics").fetchall() == [(0,)]


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"workers": -1}, "--workers must be from 0"),
        ({"sigmoid_threshold": float("nan")}, "--sigmoid-threshold must be a number between 0 and 1"),
        ({"device": "foo"}, "is not a device"),
        ({"backend": "nope"}, "unknown backend"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs a GPU"),
    ],
)
def test_bad_options_are_refused_before_the_workspace_is_touched(tmp_path, option, match):
    from audit.errors import UserError

    ds = load_dataset(make_imagefolder(tmp_path / "ds", per_class=1))
    preds = make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels)
    with pytest.raises(UserError, match=match):
        run_audit(ds, [resolve_model(f"preds:{preds}")], tmp_path / "w.duckdb", progress=False, **option)
    assert not [p for p in tmp_path.iterdir() if "duckdb" in p.name]


def test_a_workspace_inside_its_dataset_is_refused(tmp_path):
    from audit.errors import StoreError

    ds = load_dataset(make_imagefolder(tmp_path / "ds", per_class=1))
    preds = make_predictions(tmp_path / "p.npy", list(ds.image_ids), ds.labels)
    with pytest.raises(StoreError, match="inside the dataset folder"):
        run_audit(ds, [resolve_model(f"preds:{preds}")], ds.root / "w.duckdb", progress=False)
    assert not [p for p in ds.root.rglob("*") if "duckdb" in p.name]
