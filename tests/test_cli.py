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
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    # In-process through the console script's own main() (a fresh interpreter per case cost ~1.5 min of the
    # suite in imports); test_a_user_mistake_in_a_real_process covers the real process once.
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
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("audit: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert _workspace_files(tmp_path) == [], "a refused run must write nothing: no db, wal or arrays folder"


def test_a_user_mistake_in_a_real_process(tmp_path):
    """The installed entry point, in its own interpreter: one line on stderr, exit 2, no traceback."""
    res = run_cli("run", str(tmp_path / "nope"), "--db", str(tmp_path / "w.duckdb"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("audit: error:") and "does not exist" in lines[0], res.stderr
    assert _workspace_files(tmp_path) == []
    # Said before the heavy stack loads (torch and cleanlab took ~10 s to import before a typo was reported).
    probe = (
        "import sys; from audit.cli import main; "
        f"rc = main(['run', {str(tmp_path / 'nope')!r}]); print(rc, sorted({{'torch', 'cleanlab'}} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split(None, 1) == ["2", "[]\n"], out.stdout + out.stderr


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
    shards = sorted((db.parent / f"{db.name}.arrays" / "shards").rglob("*.npz"))
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


# --------------------------------------------------------------------------- issue 9: options, hints, outputs


def _rc(argv: list[str]) -> int:
    """``main(argv)``'s exit code; argparse's own refusals raise SystemExit, the console script exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _one_error_line(err: str, needle: str) -> None:
    """One ``audit: error:`` line holding ``needle``, no traceback; any other stderr line is progress (``audit: ``)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("audit: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert all(ln.startswith("audit: ") for ln in lines) and "Traceback" not in err, err


def _workspace_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("w.duckdb", ".w.duckdb")))


_NO_GPU = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the machine has a CUDA GPU, so --device cuda is valid"
)


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--batch-size", "-3"], "--batch-size must be at least 1"),
        (["--batch-size", "2.5"], "--batch-size takes a whole number"),
        (["--workers", "-1"], "--workers must be from 0 to"),
        (["--workers", "100000"], "--workers must be from 0 to"),
        (["--limit", "-1"], "--limit must be at least 1"),
        (["--device", "foo"], "'foo' is not a device; use cpu, cuda"),
        pytest.param(["--device", "cuda"], "no CUDA GPU", marks=_NO_GPU),
        pytest.param(["--device", "cuda:7"], "CUDA GPU", marks=_NO_GPU),
        (["--sigmoid-threshold", "nan"], "--sigmoid-threshold must be a number between 0 and 1"),
        (["--sigmoid-threshold", "inf"], "--sigmoid-threshold must be a number between 0 and 1"),
        (["--sigmoid-threshold", "1.5"], "--sigmoid-threshold must be a number between 0 and 1"),
        (["--sigmoid-threshold", "x"], "--sigmoid-threshold takes a number"),
        (["--backend", "tensorrt"], "invalid choice"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
        (["--backend", "onnxruntime", "--precision", "bf16", "--device", "cpu"], "onnxruntime runs fp32 only"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--env", "AUDIT_SHARD_SIZE=0"], "$AUDIT_SHARD_SIZE must be at least 1"),
        (["--env", "AUDIT_SHARD_SIZE=many"], "$AUDIT_SHARD_SIZE takes a whole number"),
    ],
)
def test_every_bad_run_option_is_one_line_exit_2_and_writes_no_workspace(tmp_path, capsys, monkeypatch, opts, needle):
    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    if opts[0] == "--env":
        name, _, value = opts[1].partition("=")
        monkeypatch.setenv(name, value)
        opts = []
    argv = ["run", str(ds_root), "--models", f"preds:{preds}", "--db", str(tmp_path / "w.duckdb"), "-q", *opts]
    assert _rc(argv) == 2
    _one_error_line(capsys.readouterr().err, needle)
    assert _workspace_files(tmp_path) == [], "a refused run writes no db, wal, arrays folder or temporary"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["issues", "--limit", "-1"], "--limit must be at least 1, got -1"),
        (["issues", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["issues", "--format", "xml"], "invalid choice"),
        (["review", "-1", "keep"], "image must be at least 0"),
        (["review", "1", "explode"], "invalid choice"),
        (["dashboard", "--port", "0"], "--port must be from 1 to 65535"),
        (["dashboard", "--port", "70000"], "--port must be from 1 to 65535"),
        (["export"], "the following arguments are required: --out"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_argparse_refusals_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert _rc([*argv, "--db", str(tmp_path / "w.duckdb")] if argv[0] != "nonsense" else argv) == 2
    _one_error_line(capsys.readouterr().err, needle)
    assert _workspace_files(tmp_path) == []


def test_db_naming_a_folder_names_the_fix_not_a_wait(tmp_path, capsys):
    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    folder = tmp_path / "wsdir"
    folder.mkdir()
    for argv in (["run", str(ds_root), "--models", "preds:/nope.npy"], ["metrics"], ["review", "0", "keep"]):
        assert _rc([*argv, "--db", str(folder)]) == 2
        err = capsys.readouterr().err
        _one_error_line(err, "is a folder; name a workspace file")
        assert "try again" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "wsdir"] and not any(folder.iterdir())
    # The same for the arrays folder beside the workspace.
    (tmp_path / "w.duckdb.arrays").write_text("someone's notes")
    assert _rc(["run", str(ds_root), "--models", "preds:/nope.npy", "--db", str(tmp_path / "w.duckdb")]) == 2
    _one_error_line(capsys.readouterr().err, "w.duckdb.arrays is a file, where workspace")
    assert not (tmp_path / "w.duckdb").exists()


def test_a_path_containing_lock_is_not_taken_for_a_lock(tmp_path, capsys):
    import time

    bad = tmp_path / "lockers" / "block.duckdb"
    bad.parent.mkdir()
    bad.write_text("image,label\n")  # not a DuckDB file
    t = time.monotonic()
    assert _rc(["metrics", "--db", str(bad)]) == 2
    assert time.monotonic() - t < 10, "no retrying for 30 s as if another process held it"
    err = capsys.readouterr().err
    _one_error_line(err, "is not a DuckDB file")
    assert "locked" not in err and "try again" not in err


def test_db_on_a_place_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import os

    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    run = ["run", str(ds_root), "--models", f"preds:{preds}", "-q"]
    # Real places this machine refuses, even to root: /proc will not make files, /sys forbids it.
    for place in (Path("/proc/audit.duckdb"), Path("/sys/audit.duckdb")):
        if place.parent.is_dir():
            assert _rc([*run, "--db", str(place)]) == 2
            _one_error_line(capsys.readouterr().err, f"creating workspace {place} failed")
    # A read-only file system (EROFS), injected at the OS calls: the same one line, nothing written.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(real):
        def call(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *a, **k)

        return call

    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    monkeypatch.setattr(os, "open", refuse(real_open))
    assert _rc([*run, "--db", str(ro / "w.duckdb")]) == 2
    _one_error_line(capsys.readouterr().err, "Read-only file system")
    assert list(ro.iterdir()) == []


def _foreign(path: Path, *stmts: str) -> Path:
    import duckdb

    con = duckdb.connect(str(path))
    for s in stmts:
        con.execute(s)
    con.close()
    return path


def _tables(path: Path) -> list[tuple[str, str]]:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() ORDER BY table_name, column_index"
        ).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize(
    ("stmts", "needle"),
    [
        (["CREATE TABLE meta (id INTEGER, note VARCHAR)"], "its table meta has columns (id INTEGER, note VARCHAR)"),
        (
            [
                "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
                "INSERT INTO meta VALUES ('schema_version', '1')",
                "CREATE TABLE images (path VARCHAR, width INTEGER)",
            ],
            "its table images has columns (path VARCHAR, width INTEGER)",
        ),
        (
            ["CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)", "INSERT INTO meta VALUES ('owner', 'x')"],
            "its meta table has no schema_version",
        ),
        (
            [
                "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
                "INSERT INTO meta VALUES ('schema_version', 'v1')",
            ],
            "has schema_version 'v1', not a number",
        ),
        (["CREATE TABLE orders (id INTEGER)"], "not an audit workspace (no meta table)"),
    ],
)
def test_another_applications_duckdb_file_is_refused_untouched(tmp_path, capsys, stmts, needle):
    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    db = _foreign(tmp_path / "w.duckdb", *stmts)
    before = _tables(db)
    for argv in (
        ["run", str(ds_root), "--models", f"preds:{preds}", "-q"],
        ["run", "-q"],
        ["metrics"],
        ["issues"],
        ["runs"],
        ["review", "0", "keep"],
        ["export", "--out", str(tmp_path / "out")],
    ):
        assert _rc([*argv, "--db", str(db)]) == 2, argv
        _one_error_line(capsys.readouterr().err, needle)
    assert _tables(db) == before, "the other application's file is left as it was"


def test_a_newer_schema_version_says_upgrade(synth_ws, capsys):
    from audit.store import SCHEMA_VERSION, connect

    _, db, _, _ = synth_ws
    with connect(db) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(SCHEMA_VERSION + 1), "schema_version"])
    assert _rc(["metrics", "--db", str(db)]) == 2
    _one_error_line(capsys.readouterr().err, "upgrade audit")


def test_custom_classes_with_an_imagenet_model_finish_with_a_note(tmp_path, capsys):
    ds_root = make_imagefolder(tmp_path / "custom", per_class=2, wnids=("cat", "dog"))
    ckpt = make_checkpoint(tmp_path / "mnv3.pth")
    db = tmp_path / "w.duckdb"
    argv = ["run", str(ds_root), "--models", ckpt, "--db", str(db), "-q", "--workers", "0", "--backend", "torch"]
    assert _rc(argv) == 0
    err = capsys.readouterr().err
    assert "note: no model predicts this dataset's 2 classes" in err and "no metrics" in err
    assert _rc(["runs", "--db", str(db), "--format", "json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["status"] == "finished"
    assert _rc(["metrics", "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert _rc(["issues", "--db", str(db), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("rank,image_index")
    assert _rc(["export", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "labels.csv").read_text().count("\n") == 1 + 4


def test_a_workspace_inside_the_dataset_is_refused(tmp_path, capsys):
    ds_root = make_imagefolder(tmp_path / "ds", per_class=1)
    ds = load_dataset(ds_root)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    listing = sorted(p.relative_to(ds_root) for p in ds_root.rglob("*"))
    for db in (ds_root / "w.duckdb", ds_root / "val" / "w.duckdb", ds_root / "val" / WNID0 / "w.duckdb"):
        assert _rc(["run", str(ds_root), "--models", f"preds:{preds}", "--db", str(db), "-q"]) == 2
        _one_error_line(capsys.readouterr().err, "inside the dataset folder")
    assert sorted(p.relative_to(ds_root) for p in ds_root.rglob("*")) == listing, "nothing written into the dataset"


WNID0 = "n01440764"


@pytest.fixture
def flat_ws(tmp_path, capsys):
    """A flat folder with a label file and a ReaL file kept in tmp/meta/, and its workspace."""
    from _synth import WNIDS
    from PIL import Image

    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        name = f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name)
        rows.append(f"{name},{WNIDS[i % 4]}")
    meta = tmp_path / "meta"
    meta.mkdir()
    labels = meta / "labels.csv"
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset(root, label_file=labels)
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    db = tmp_path / "w.duckdb"
    assert main(["run", str(root), "--labels", str(labels), "--models", f"preds:{preds}", "--db", str(db), "-q"]) == 0
    capsys.readouterr()
    return root, labels, db


def test_exports_that_would_harm_the_inputs_are_refused_and_reruns_still_work(flat_ws, tmp_path, capsys):
    root, labels, db = flat_ws
    labels_before = labels.read_bytes()
    listing = sorted(root.iterdir())
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    link = tmp_path / "meta_link"
    link.symlink_to(labels.parent, target_is_directory=True)
    for out, needle in (
        (afile, "is a file; pass a folder"),
        (root, "inside the dataset folder"),
        (root / "cleaned", "inside the dataset folder"),
        (labels.parent, "the label file workspace"),
        (link, "the label file workspace"),  # the same folder by another path
        (Path(f"{db}.arrays") / "x", "inside workspace"),
    ):
        assert _rc(["export", "--db", str(db), "--out", str(out)]) == 2, out
        _one_error_line(capsys.readouterr().err, needle)
    assert labels.read_bytes() == labels_before and sorted(root.iterdir()) == listing
    assert afile.read_text() == "keep me"
    # The workspace's inputs are intact: a bare rerun reads the same label file and runs.
    assert _rc(["run", "--db", str(db), "-q"]) == 0
    assert _rc(["export", "--db", str(db), "--out", str(tmp_path / "cleaned")]) == 0
