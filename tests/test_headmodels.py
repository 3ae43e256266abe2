"""Heads as models of a run (issue 10 §2): custom label space, prediction files plus features given through the seam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _synth import make_predictions

from audit import pipeline
from audit.cli import main
from audit.datasets import load_dataset
from audit.headmodels import HEADS_MIN_AGREEMENT, head_agreement, weak_heads_warning
from audit.store import connect

CLASSES = ("scratch", "dent", "ok")
N = 60
WRONG = (5, 17, 30, 44)  # given labels that are not the image's class


@pytest.fixture
def parts(tmp_path, make_image) -> tuple[Path, Path, np.ndarray]:
    root = tmp_path / "parts"
    rows = ["path,label"]
    cls = np.arange(N) % 3
    for k in range(N):
        make_image(root / f"p{k:02d}.png", seed=k)
        given = (cls[k] + 1) % 3 if k in WRONG else cls[k]
        rows.append(f"p{k:02d}.png,{CLASSES[given]}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels, cls


def _features(ds, cls_by_id: dict[str, int], sep: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cls = np.array([cls_by_id[i] for i in ds.image_ids])
    centres = rng.normal(0, 1, (3, 16)) * sep
    return (centres[cls] + rng.normal(0, 1, (len(cls), 16))).astype(np.float16)


def _setup(tmp_path, parts, monkeypatch, sep: float) -> tuple[list[str], Path]:
    root, labels, cls = parts
    ds = load_dataset(root, label_file=labels)
    assert not ds.label_space.imagenet
    cls_by_id = {f"p{k:02d}.png": int(c) for k, c in enumerate(cls)}
    # An ImageNet-width prediction file stands in for a zoo model: stored as context in a custom space.
    pred = make_predictions(tmp_path / "zoo.npy", list(ds.image_ids), ds.labels, n_classes=1000, seed=3)
    feats = _features(ds, cls_by_id, sep)
    calls = []

    def seam(a):
        calls.append(a.spec.name)
        return feats

    monkeypatch.setattr(pipeline, "_features_of", seam)
    argv = ["run", str(root), "--labels", str(labels), "--models", f"preds:{pred}", "--folds", "5", "-q"]
    return argv, calls


def test_custom_space_heads_become_models_and_flag_the_wrong_labels(tmp_path, parts, monkeypatch, capsys):
    argv, calls = _setup(tmp_path, parts, monkeypatch, sep=3.0)
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--db", str(db)]) == 0
    err = capsys.readouterr().err
    assert "heads agree" not in err  # strong heads: no warning
    with connect(db, read_only=True) as con:
        models = {r[0]: r[1:] for r in con.execute(
            "SELECT model, source, arch, loss, num_classes, preprocess, logits_file FROM models").fetchall()}
        metric_models = {r[0] for r in con.execute("SELECT DISTINCT model FROM metrics").fetchall()}
        flagged = {r[0] for r in con.execute("SELECT image_index FROM label_issues WHERE is_label_issue").fetchall()}
    (base,) = [m for m in models if models[m][0] == "predictions"]
    soft, sig = f"{base}+softmax-head", f"{base}+sigmoid-head"
    assert models[soft][:4] == ("head", base, "softmax", 3) and models[sig][:3] == ("head", base, "sigmoid")
    p = json.loads(models[soft][4])
    assert p["kind"] == "softmax" and p["folds"] == 5 and p["features"] == base and p["features_dim"] == 16
    assert p["C"] in p["c_grid"]
    # The zoo model's ImageNet predictions are stored, not evaluated; the heads and their ensemble are.
    assert metric_models == {soft, sig, "ensemble"}
    logits = np.load(models[sig][5])
    assert logits.shape == (N, 3) and np.isfinite(logits).all()
    assert set(WRONG) <= flagged  # ids sort as p00..p59, so indices are the rows above
    # A rerun reads the fitted heads back: the seam is asked again, nothing is refitted.
    stamp = Path(models[soft][5]).stat().st_mtime_ns
    assert main([*argv, "--db", str(db)]) == 0
    assert Path(models[soft][5]).stat().st_mtime_ns == stamp and len(calls) == 2


def test_weak_heads_warn_in_the_summary_and_the_dashboard(tmp_path, parts, monkeypatch, capsys):
    from streamlit.testing.v1 import AppTest

    from audit import queries as q

    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=0.0)  # features carry nothing of the class
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--db", str(db)]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "heads agree" in ln]
    assert line.startswith("audit: warning: heads agree with the given labels on ") and "add stronger models" in line
    text = q.heads_warning(db)
    assert text and text in line
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert any(w.value == "Heads too weak to trust" for w in at.warning) and any(text in t.value for t in at.text)


def test_folds_are_checked_before_anything_is_written(tmp_path, parts, monkeypatch, capsys):
    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=3.0)
    db = tmp_path / "w.duckdb"
    argv[argv.index("--folds") + 1] = "61"
    assert main([*argv, "--heads", "--db", str(db)]) == 2  # asked for: refused before anything is written
    assert "only 60 images" in capsys.readouterr().err and not db.exists()
    assert main([*argv, "--db", str(db)]) == 0  # the default heads of a custom space: skipped, with why
    assert "no heads: 60 readable images in 3 classes" in capsys.readouterr().err
    argv[argv.index("--folds") + 1] = "1"
    try:  # argparse's own check: one line, exit 2 (returned by main, or raised by an older main)
        code = main([*argv, "--db", str(db)])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--folds must be at least 2" in capsys.readouterr().err


def test_no_heads_without_features_says_why(tmp_path, parts, capsys):
    root, labels, _ = parts
    ds = load_dataset(root, label_file=labels)
    pred = make_predictions(tmp_path / "zoo.npy", list(ds.image_ids), ds.labels, n_classes=1000)
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--labels", str(labels), "--models", f"preds:{pred}", "--db", str(db), "-q"]) == 0
    assert "no features stored, so no heads" in capsys.readouterr().err


def test_agreement_and_warning_rule():
    labels = np.array([0, 1, 2, 0])
    probs = np.eye(3)[[0, 1, 1, 0]].astype(np.float32)
    assert head_agreement([probs], labels, np.ones(4, bool)) == pytest.approx(0.75)
    assert head_agreement([probs], labels, np.array([1, 1, 0, 1], bool)) == pytest.approx(1.0)
    assert weak_heads_warning(HEADS_MIN_AGREEMENT) is None
    assert "76%" in weak_heads_warning(0.76)


def test_heads_on_request_for_an_imagenet_dataset(tmp_path, monkeypatch, capsys):
    from _synth import make_imagefolder

    root = make_imagefolder(tmp_path / "ds", per_class=6)
    ds = load_dataset(root)
    pred = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels, flip=np.array([2, 9]))
    pred2 = make_predictions(tmp_path / "n.npy", list(ds.image_ids), ds.labels, flip=np.array([2]), seed=5)
    rng = np.random.default_rng(0)
    feats = (np.eye(4)[ds.labels % 4] * 4 + rng.normal(0, 1, (len(ds), 4))).astype(np.float32)
    monkeypatch.setattr(pipeline, "_features_of", lambda a: feats if a.spec.name == "preds:m" else None)
    db = tmp_path / "w.duckdb"
    argv = ["run", str(root), "--models", f"preds:{pred},preds:{pred2}", "--db", str(db), "-q", "--folds", "3"]
    assert main([*argv, "--heads"]) == 0
    with connect(db, read_only=True) as con:
        models = {r[0]: r[1] for r in con.execute("SELECT model, num_classes FROM models").fetchall()}
        evaluated = {r[0] for r in con.execute("SELECT DISTINCT model FROM metrics").fetchall()}
    heads = {m for m in models if m.endswith("-head")}
    assert len(heads) == 2 and {models[m] for m in heads} == {1000} and heads | {"ensemble"} < evaluated
    from audit.heads_table import heads_table

    a, b = sorted(set(models) - heads)
    assert {m.split("+")[0] for m in heads} == {"preds:m"}  # no features, no heads
    df = heads_table(db, folds=3, features={a: feats, b: feats[:, :2]})
    assert len(df) == 12 and set(df["truth"]) == {"ReaL"} and df["truth_top1"].between(0, 1).all()
    assert set(df["model"]) == {a, b, f"{a} + {b}"}
    assert main(argv) == 0  # without --heads an ImageNet dataset gets none
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM models WHERE source = ?", ["head"]).fetchone()[0] == 0


# --------------------------------------------------------------------------- audit heads


def test_heads_table_rows_match_the_run_and_clean_training_drops_the_flags(tmp_path, parts, monkeypatch, capsys):
    from audit import heads_table as ht
    from audit import queries as q

    cls = parts[2]
    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=1.2)
    from types import SimpleNamespace

    feats = pipeline._features_of(SimpleNamespace(spec=SimpleNamespace(name="any")))
    truth = tmp_path / "truth.csv"
    truth.write_text("path,label\n" + "".join(f"p{k:02d}.png,{CLASSES[c]}\n" for k, c in enumerate(cls)))
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--truth", str(truth), "--db", str(db)]) == 0
    q.record_decision(db, WRONG[0], "relabel", labels=[int(cls[WRONG[0]])], reviewer="t")
    with connect(db, read_only=True) as con:
        (base,) = con.execute("SELECT model FROM models WHERE source = ?", ["predictions"]).fetchone()
    df = ht.heads_table(db, folds=5, features={base: feats})
    assert len(df) == 4 and set(zip(df["head"], df["labels"], strict=True)) == {
        (h, t) for h in ("softmax", "sigmoid") for t in ("given", "clean")
    }
    m = q.metrics_table(db)
    with connect(db, read_only=True) as con:
        flagged = {r[0] for r in con.execute("SELECT image_index FROM label_issues WHERE is_label_issue").fetchall()}
    for kind in ("softmax", "sigmoid"):
        row = df[(df["head"] == kind) & (df["labels"] == "given")].iloc[0]
        stored = m[(m["model"] == f"{base}+{kind}-head") & (m["evaluation"] == "original") & (m["metric"] == "top1")]
        assert row["given_top1"] == pytest.approx(stored["value"].iloc[0]) and row["n_train"] == N
        truth_row = m[(m["model"] == f"{base}+{kind}-head") & (m["evaluation"] == "truth") & (m["metric"] == "top1")]
        assert row["truth"] == "truth" and row["truth_top1"] == pytest.approx(truth_row["value"].iloc[0])
        assert row["given_low"] < row["given_top1"] < row["given_high"]
        clean = df[(df["head"] == kind) & (df["labels"] == "clean")].iloc[0]
        # Flagged images leave the training set, except the one a decision relabeled.
        assert clean["n_train"] == N - len(flagged - {WRONG[0]}) and clean["n_given"] == N
    # The command: each format, features through the seam.
    monkeypatch.setattr(ht, "_stored_features", lambda model, _f: feats if model == base else None)
    capsys.readouterr()
    assert main(["heads", "--db", str(db), "--folds", "5", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert main(["heads", "--db", str(db), "--folds", "5"]) == 0
    out = capsys.readouterr().out
    assert "given top-1 (95%)" in out and "clean" in out
    monkeypatch.setattr(ht, "_stored_features", lambda model, _f: None)
    assert main(["heads", "--db", str(db)]) == 0
    assert "no model of this workspace has stored features" in capsys.readouterr().err
    assert main(["heads", "--db", str(tmp_path / "none.duckdb")]) == 2


def test_review_shows_what_imagenet_sees_for_a_custom_space(tmp_path, parts, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from audit import queries as q
    from audit.datasets import imagenet_label_space

    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=3.0)
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--db", str(db)]) == 0
    d = q.image_detail(db, WRONG[0])
    ((model, top),) = d["imagenet"]  # the ImageNet-width model only, not the heads
    assert not model.endswith("-head") and len(top) == 3
    ds = load_dataset(parts[0], label_file=parts[1])
    # make_predictions favours ImageNet class = the given label's index: that name comes first.
    assert top[0][0] == imagenet_label_space().names[int(ds.labels[WRONG[0]])] and top[0][1] > 0.5
    (line,) = q.imagenet_sees(d)
    assert line.startswith(f"ImageNet sees ({model}): {top[0][0]} ")
    monkeypatch.setenv("AUDIT_DB", str(db))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    at.run()
    at.sidebar.radio(key="page").set_value("Review").run()
    assert not at.exception, at.exception
    assert any(t.value.startswith("ImageNet sees (") for t in at.text)


def test_custom_space_sigmoid_evaluation_scores_the_sigmoid_head(tmp_path, parts, monkeypatch, capsys):
    argv, _ = _setup(tmp_path, parts, monkeypatch, sep=3.0)
    db = tmp_path / "w.duckdb"
    assert main([*argv, "--db", str(db)]) == 0
    assert "the sigmoid evaluation is against the given labels" in capsys.readouterr().err
    with connect(db, read_only=True) as con:
        rows = con.execute(
            "SELECT model, metric, value, params FROM metrics WHERE evaluation = ? AND metric = ?", ["sigmoid", "f1"]
        ).fetchall()
    by = {r[0]: r for r in rows}
    sig = next(m for m in by if m.endswith("+sigmoid-head"))
    assert 0.5 < by[sig][2] <= 1 and json.loads(by[sig][3])["against"] == "given labels"


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_clean_training_predicts_the_left_out_images_too(n_classes, kind):
    from audit.heads_table import _out_of_fold_top1

    rng = np.random.default_rng(1)
    cls = np.arange(90) % n_classes
    x = (np.eye(n_classes)[cls] * 5 + rng.normal(0, 1, (90, n_classes))).astype(np.float32)
    lab = cls.copy()
    lab[::7] = -1  # left out of training (flagged): still predicted, by a head that never saw them
    valid = np.ones(90, bool)
    valid[3] = False
    top1, c = _out_of_fold_top1(x, np.where(valid, lab, -1), valid, n_classes, kind, 5, 0)
    assert top1[3] == -1 and (top1[valid] >= 0).all() and c > 0
    assert (top1[valid] == cls[valid]).mean() > 0.95
