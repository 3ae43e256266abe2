"""CLI: the README's commands, user mistakes (one line, exit 2) and the real-weights integration run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _synth import make_checkpoint, make_imagefolder, make_predictions

from audit.cli import main
from audit.datasets import load_dataset

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def synth_ws(tmp_path, capsys):
    ds_root = make_imagefolder(tmp_path / "ds")
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels, flip=np.array([2, 9]))
    db = tmp_path / "w.duckdb"
    assert main(["run", str(ds_root), "--models", f"preds:{preds}", "--db", str(db), "-q"]) == 0
    return ds_root, db, ds, capsys.readouterr().out


def test_run_metrics_issues_export(synth_ws, capsys, tmp_path):
    _, db, ds, out = synth_ws
    assert re.search(r"flagged images: \d+ of 24", out)
    assert main(["metrics", "--db", str(db), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"model", "evaluation", "metric", "value", "low", "high", "n"} <= set(rows[0])
    top1 = next(r for r in rows if r["model"] == "ensemble" and r["evaluation"] == "original" and r["metric"] == "top1")
    assert top1["value"] == pytest.approx(22 / 24)
    assert main(["issues", "--db", str(db), "--format", "csv"]) == 0
    issues = capsys.readouterr().out.splitlines()
    assert issues[0].startswith("rank,image_index,image_id")
    assert {ln.split(",")[1] for ln in issues[1:3]} == {"2", "9"}
    assert main(["review", "2", "relabel", "--labels", "n01443537", "--db", str(db), "--reviewer", "t"]) == 0
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    labels = (tmp_path / "out" / "labels.csv").read_text().splitlines()
    row = next(ln for ln in labels if ln.startswith(ds.image_ids[2] + ","))
    assert row.split(",")[1:4] == ["1", "1", "relabeled"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "/nonexistent/folder"], "does not exist"),
        (["run", "{ds}", "--models", "no_such_model_xyz"], "unknown model"),
        (["run", "{ds}", "--models", "resnet50.NOPE"], "has no weights"),
        (["run", "{ds}", "--models", "preds:/nope.npy"], "does not exist"),
        (["run", "{ds}", "--limit", "0", "--models", "preds:{preds}"], "--limit"),
        (["run", "{ds}", "--labels", "/nope.csv", "--models", "preds:{preds}"], "cannot read label file"),
        (["run", "{tmp}/empty"], "no images found"),
        (["run", "{tmp}/mixed"], "neither an ImageNet wnid"),
        (["run", "{ds}", "--real", "{tmp}/short_real.json", "--models", "preds:{preds}"], "expected a list of 50000"),
        (["run", "{ds}", "--models", "resnet18@{tmp}/ten.pth"], "predicts 10 classes"),
        (["run", "{tmp}/custom", "--models", "resnet18@{tmp}/ten.pth"], "dataset has 2"),
        (["metrics", "--db", "{tmp}/missing.duckdb"], "no audit workspace"),
        (["issues", "--db", "{tmp}/missing.duckdb"], "no audit workspace"),
        (["export", "--db", "{tmp}/missing.duckdb", "--out", "{tmp}/o"], "no audit workspace"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, argv, needle):
    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    (tmp_path / "empty").mkdir()
    make_imagefolder(tmp_path / "mixed", per_class=1, wnids=("n01440764", "holiday_photos"))
    make_imagefolder(tmp_path / "custom", per_class=1, wnids=("cat", "dog"))
    (tmp_path / "short_real.json").write_text("[[1], [2]]")
    if "ten.pth" in " ".join(argv):
        import torch
        import torchvision

        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pth")
    args = [a.format(ds=ds_root, tmp=tmp_path, preds=preds) for a in argv]
    if args[0] == "run":
        args += ["--db", str(tmp_path / "w.duckdb")]
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("audit: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "w.duckdb").exists(), "a refused run must write nothing"


def test_review_mistakes_exit_2(synth_ws, capsys):
    _, db, _, _ = synth_ws
    assert main(["review", "0", "relabel", "--labels", "not-a-class", "--db", str(db)]) == 2
    assert main(["review", "999", "keep", "--db", str(db)]) == 2
    assert main(["review", "0", "multi", "--labels", "n01443537", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("audit: error:") == 3 and "Traceback" not in err


def test_models_lists_registry_with_availability(capsys):
    assert main(["models", "efficientnet_lite*", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    lite = {r["model"]: r for r in rows if r["source"] == "efficientnet-lite"}
    assert set(lite) == {"efficientnet_lite0.in1k", "efficientnet_lite1.in1k", "efficientnet_lite2.in1k"}
    assert all(r["weights"] == "available" for r in lite.values())


# Measured in ../shared/README.md on the full 1,300 images with the same weights and preprocessing.
README_LITE0_TOP1, README_LITE0_REAL = 0.832, 0.885


@pytest.mark.slow
def test_real_lite0_on_shared_subset(shared_dir, tmp_path):
    """``audit run`` with the real Lite0 weights on 100 real images.

    Tolerance: the README's full-set figure must lie inside the 95% Wilson
    interval measured on the 100-image subset (about +-8 points), and the
    subset's accuracy within 10 points of it.
    """
    db = tmp_path / "w.duckdb"
    res = run_cli(
        "run", str(shared_dir / "datasets" / "imagenet-val-1300"), "--models", "efficientnet_lite0",
        "--limit", "100", "--db", str(db), "--format", "json", "-q", timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    body = res.stdout[: res.stdout.rindex("]") + 1]
    rows = json.loads(body)
    got = {(r["model"], r["evaluation"], r["metric"]): r for r in rows}
    for key, ref in (
        (("efficientnet_lite0.in1k", "original", "top1"), README_LITE0_TOP1),
        (("efficientnet_lite0.in1k", "real", "top1"), README_LITE0_REAL),
    ):
        r = got[key]
        assert r["low"] <= ref <= r["high"], (key, r)
        assert abs(r["value"] - ref) <= 0.10, (key, r)
    assert got[("efficientnet_lite0.in1k", "original", "top1")]["n"] == 100
    assert re.search(r"flagged images: \d+ of 100", res.stdout)


def test_dashboard_binds_localhost_by_default():
    from audit.cli import _parser

    assert _parser().parse_args(["dashboard"]).host == "127.0.0.1"


def test_second_run_on_a_busy_workspace_is_refused(synth_ws, tmp_path):
    from audit.store import workspace_lock

    ds_root, db, _, _ = synth_ws
    preds = tmp_path / "m.npy"
    with workspace_lock(db):
        res = run_cli("run", str(ds_root), "--models", f"preds:{preds}", "--db", str(db), "-q")
    assert res.returncode == 2 and "another audit run" in res.stderr and "Traceback" not in res.stderr


def _models_in(db: Path) -> tuple[list[str], list[str], int]:
    from audit.store import connect

    with connect(db, read_only=True) as con:
        models = [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
        metric_models = [r[0] for r in con.execute("SELECT DISTINCT model FROM metrics ORDER BY model").fetchall()]
        runs = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    return models, metric_models, runs


def test_a_bare_rerun_continues_the_workspace_with_its_dataset_and_models(synth_ws, tmp_path, capsys):
    ds_root, db, _, _ = synth_ws
    before, _, _ = _models_in(db)
    # From another folder, with neither dataset nor --models: the workspace's own are used.
    res = run_cli("run", "--db", str(db), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"continuing workspace {db}" in res.stderr and str(ds_root) in res.stderr
    after, _, runs = _models_in(db)
    assert after == before and runs == 2


def test_a_run_defines_the_workspace_models_and_dropped_ones_come_back_without_rescoring(synth_ws, tmp_path, capsys):
    ds_root, db, _, _ = synth_ws
    m1, m2 = f"preds:{tmp_path / 'm.npy'}", make_checkpoint(tmp_path / "mnv3.pth")
    assert main(["run", str(ds_root), "--models", f"{m1},{m2}", "--db", str(db), "-q", "--workers", "0"]) == 0
    two, metric_models, _ = _models_in(db)
    assert len(two) == 2 and set(metric_models) == {*two, "ensemble"}
    shards = sorted((db.parent / f"{db.name}.arrays").rglob("*.npz"))
    assert shards
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    capsys.readouterr()

    assert main(["run", str(ds_root), "--models", m1, "--db", str(db), "-q"]) == 0
    err = capsys.readouterr().err
    one, metric_models, _ = _models_in(db)
    (gone,) = set(two) - set(one)
    assert gone.startswith("mobilenet_v3_small") and set(metric_models) == {*one, "ensemble"}
    assert f"note: {gone} (from an earlier run) left the workspace" in err
    assert all(p.exists() for p in shards), "the dropped model's scores stay cached"

    assert main(["run", str(ds_root), "--models", f"{m1},{m2}", "--db", str(db), "-q", "--workers", "0"]) == 0
    assert _models_in(db)[0] == two
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps, "listing it again rescored nothing"


def test_runs_lists_every_run_with_what_ran(synth_ws, capsys):
    _, db, _, _ = synth_ws
    assert main(["run", "--db", str(db), "-q"]) == 0
    capsys.readouterr()
    assert main(["runs", "--db", str(db), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert rows[0]["started_at"] > rows[1]["started_at"] and rows[0]["started_at"].startswith("20")
    assert rows[0]["models"].startswith("preds:") and rows[0]["n_images"] == 24
    assert rows[0]["images_scored"] == 0  # imported predictions: nothing to score
