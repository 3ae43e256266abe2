"""The feature-space checks through ``audit run``: registered, fed the run's features, stored in ``issues``.

A small ImageFolder scored by a random-weights zoo checkpoint (its penultimate features are
recorded in the forward pass) with one image copied, byte for byte, into another class's
folder: the exact and the near duplicate checks must both pair the two, the copy's label
conflict must be said, and ``label_knn`` must read the label check's result of the same run
rather than recompute it.
"""

from __future__ import annotations

import json
import shutil

import pytest
from _synth import make_checkpoint, make_imagefolder

from audit import queries as q
from audit.checks import default_names
from audit.cli import main
from audit.store import connect

FEATURE_CHECKS = ("knn_label", "label_knn", "outlier", "near_duplicate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checks_run")
    root = make_imagefolder(tmp / "ds", per_class=6, size=(48, 40))
    folders = sorted((root / "val").iterdir())
    src = sorted(folders[0].iterdir())[0]
    dst = folders[1] / "ILSVRC2012_val_00000999.JPEG"
    shutil.copyfile(src, dst)  # the same photo, filed under another class
    # SqueezeNet: a random MobileNetV3 gives all-zero penultimate features (no cosine to compare by).
    model = make_checkpoint(tmp / "ckpt" / "m.pth", arch="squeezenet1_1")
    db = tmp / "w.duckdb"
    assert main(["run", str(root), "--models", model, "--db", str(db), "-q"]) == 0
    return db, f"{folders[0].name}/{src.name}", f"{folders[1].name}/{dst.name}"


def test_feature_checks_are_on_by_default_and_all_ran(workspace):
    db, _, _ = workspace
    assert set(FEATURE_CHECKS) <= set(default_names())
    with connect(db, read_only=True) as con:
        ran = dict(con.execute('SELECT "check", summary FROM checks').fetchall())
        counts = dict(con.execute('SELECT "check", count(*) FROM issues GROUP BY ALL').fetchall())
        n = con.execute("SELECT count(*) FROM images").fetchone()[0]
    for name in FEATURE_CHECKS:
        assert name in ran, name
        summary = json.loads(ran[name])
        assert "skipped" not in summary and summary["n_assessed"] == n, (name, summary)
        assert counts[name] == n  # one row per image: its score, flagged or not
    # label_knn took the label check's scores and count from this run (the runner leaves each result).
    lk = json.loads(ran["label_knn"])
    assert lk["label_scores_from"] == "label check"
    assert lk["n_issues"] == json.loads(ran["label"])["n_issues"]


def test_the_copy_is_a_near_and_an_exact_duplicate_of_its_source(workspace):
    db, src, dst = workspace
    for check in ("near_duplicate", "exact_duplicate"):
        df = q.check_issues(db, check)
        flagged = dict(zip(df["image_id"], df["suggested"], strict=True))
        assert flagged.get(src) == dst and flagged.get(dst) == src, (check, flagged)
    near = q.check_issues(db, "near_duplicate").set_index("image_id")
    info = json.loads(near.at[src, "info"])
    assert info["labels_differ"] is True, info


def test_issues_command_lists_a_feature_check(workspace, capsys):
    db, src, _ = workspace
    capsys.readouterr()
    assert main(["issues", "--db", str(db), "--check", "near_duplicate", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert src in {r["image_id"] for r in rows}
    assert main(["issues", "--db", str(db), "--check", "knn_label", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_a_run_without_features_skips_the_feature_checks_with_a_note(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "ds", per_class=4, size=(40, 32))
    model = make_checkpoint(tmp_path / "ckpt" / "m.pth")
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--models", model, "--db", str(db), "--no-features", "-q"]) == 0
    err = capsys.readouterr().err
    assert "knn_label" in err and "skipped: needs features" in err  # the run says so, one line a check
    for name in ("knn_label", "label_knn"):
        assert q.check_note(db, name) and "features" in q.check_note(db, name), name
    # outlier needs features or probabilities: with the model's probabilities it still runs; near_duplicate
    # needs features or pixel statistics: it runs on the decode pass's perceptual hashes.
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM issues WHERE \"check\" = 'outlier'").fetchone()[0] > 0
        n = con.execute("SELECT count(*) FROM images").fetchone()[0]
        assert con.execute("SELECT count(*) FROM issues WHERE \"check\" = 'near_duplicate'").fetchone()[0] == n
        (summary,) = con.execute("SELECT summary FROM checks WHERE \"check\" = 'near_duplicate'").fetchone()
    assert json.loads(summary)["inputs_used"] == ["pixels"]
    assert q.check_note(db, "near_duplicate") is None
