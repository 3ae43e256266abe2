"""Faults: kill -9 during a DB write, during export, and while two reviewers append decisions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _synth import make_imagefolder, make_predictions

from audit.datasets import load_dataset
from audit.export import export_labels
from audit.pipeline import run_audit
from audit.store import append_decision, connect
from audit.zoo import resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path):
    ds = load_dataset(make_imagefolder(tmp_path / "ds", per_class=10))
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels, flip=np.array([3, 17]))
    db = tmp_path / "w.duckdb"
    run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    return ds, db, preds


def _spawn(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _wait_for_line(p: subprocess.Popen[str], n: int, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        lines.append(line.strip())
    return lines


def test_kill_during_ingest_leaves_db_consistent_and_rerun_recovers(workspace):
    ds, db, preds = workspace
    with connect(db, read_only=True) as con:
        before = con.execute("SELECT count(*) FROM predictions").fetchall()[0][0]
    # Re-running the same job rewrites every table in one transaction; kill it repeatedly mid-way.
    code = f"""
        from pathlib import Path
        from audit.datasets import load_dataset
        from audit.pipeline import run_audit
        from audit.zoo import resolve_model
        ds = load_dataset({str(ds.root)!r})
        print("start", flush=True)
        while True:
            run_audit(ds, [resolve_model("preds:{preds}")], Path({str(db)!r}), progress=False)
            print("done", flush=True)
    """
    p = _spawn(code)
    assert _wait_for_line(p, 2) == ["start", "done"]
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with connect(db, read_only=True) as con:
        n_pred = con.execute("SELECT count(*) FROM predictions").fetchall()[0][0]
        statuses = {r[0] for r in con.execute("SELECT status FROM runs").fetchall()}
    assert n_pred == before, "an interrupted ingest is rolled back as a whole"
    assert "finished" in statuses
    res = run_audit(ds, [resolve_model(f"preds:{preds}")], db, progress=False)
    assert res.n_flagged >= 2


def test_two_reviewers_one_killed_lose_nothing(workspace):
    _, db, _ = workspace
    code = """
        import sys
        from audit.store import append_decision
        who = sys.argv[1] if len(sys.argv) > 1 else "x"
        for k in range(10_000):
            i = append_decision({db!r}, k % 40, "relabel", labels=[k % 4], reviewer="{who}", timeout=60)
            print(i, flush=True)
    """
    killed = _spawn(code.format(db=str(db), who="killed"))
    survivor = _spawn(code.format(db=str(db), who="survivor").replace("range(10_000)", "range(40)"))
    acked = _wait_for_line(killed, 15)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    acked += [ln for ln in killed.stdout.read().splitlines() if ln]  # type: ignore[union-attr]
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0
    with connect(db, read_only=True) as con:
        ids = {
            who: {r[0] for r in con.execute("SELECT decision_id FROM decisions WHERE reviewer = ?", [who]).fetchall()}
            for who in ("killed", "survivor")
        }
    assert {int(x) for x in out.split()} == ids["survivor"] and len(ids["survivor"]) == 40
    # Every decision the killed reviewer was told about is there; at most the one in flight is not.
    assert {int(x) for x in acked} <= ids["killed"]
    assert len(ids["killed"]) - len(acked) in (0, 1)
    append_decision(db, 0, "keep", reviewer="after")  # the workspace still takes writes


def test_kill_during_export_never_leaves_half_files(workspace, tmp_path):
    _, db, _ = workspace
    append_decision(db, 3, "relabel", labels=[2], reviewer="t")
    ref = export_labels(db, tmp_path / "ref")
    out = tmp_path / "out"
    code = f"""
        from audit.export import export_labels
        print("start", flush=True)
        while True:
            export_labels({str(db)!r}, {str(out)!r})
    """
    p = _spawn(code)
    _wait_for_line(p, 1)
    time.sleep(3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for name in ref.files:
        f = out / name
        if f.exists():
            assert f.read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    export_labels(db, out)  # the rerun completes and clears stale temporary files
    assert sorted(x.name for x in out.iterdir()) == sorted(ref.files)


# --------------------------------------------------------------------------- issue 9: creation, full disks


def _cli(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """``audit`` in a subprocess, after ``code`` (a fault to inject) has run in it."""
    prog = f"{textwrap.dedent(code)}\nimport sys\nfrom audit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", prog, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _error_line(res: subprocess.CompletedProcess[str], needle: str) -> None:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("audit: error:")]
    assert res.returncode == 2 and len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def _runs(db: Path) -> list[str]:
    with connect(db, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT status FROM runs ORDER BY started_at").fetchall()]


# SIGKILL itself the moment DuckDB has made a database file, before any table is in it.
_DIE_WHEN_THE_FILE_APPEARS = """
    import os, signal, duckdb
    _connect = duckdb.connect
    def connect_then_die(path=":memory:", *a, **k):
        con = _connect(path, *a, **k)
        if str(path) != ":memory:" and not k.get("read_only"):
            os.kill(os.getpid(), signal.SIGKILL)
        return con
    duckdb.connect = connect_then_die
"""


def test_kill_9_as_the_workspace_file_appears_then_a_rerun_succeeds(tmp_path, capsys):
    from audit.cli import main

    ds = load_dataset(make_imagefolder(tmp_path / "ds", per_class=2))
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    db = tmp_path / "w.duckdb"
    args = ["run", str(ds.root), "--models", f"preds:{preds}", "--db", str(db), "-q"]
    # What `audit run` does first to a new workspace, without its imports (torch) to keep the test quick.
    create = f"from audit.store import connect\nwith connect({str(db)!r}, create=True):\n    pass\n"
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DIE_WHEN_THE_FILE_APPEARS) + create], cwd=REPO, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    assert not db.exists(), "creation is atomic: no half-made workspace at the path"
    assert main(args) == 0, capsys.readouterr().err
    assert _runs(db) == ["finished"]
    # The killed creation's temporary is swept.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "m.ids.txt", "m.npy", "w.duckdb", "w.duckdb.arrays"]


@pytest.mark.parametrize("leftover", ["zero-byte file", "table-less database"])
def test_a_half_made_workspace_from_an_older_killed_run_is_rebuilt(tmp_path, capsys, leftover):
    import duckdb

    from audit.cli import main

    ds = load_dataset(make_imagefolder(tmp_path / "ds", per_class=2))
    preds = make_predictions(tmp_path / "m.npy", list(ds.image_ids), ds.labels)
    db = tmp_path / "w.duckdb"
    if leftover == "zero-byte file":
        db.touch()
    else:
        duckdb.connect(str(db)).close()
    assert main(["metrics", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("audit: error:") == 1 and "to build it" in err
    assert main(["run", str(ds.root), "--models", f"preds:{preds}", "--db", str(db), "-q"]) == 0
    assert _runs(db) == ["finished"]


def _enospc(path: Path) -> None:
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_scoring_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    from _synth import make_checkpoint

    from audit import _io
    from audit.cli import main

    root = make_imagefolder(tmp_path / "ds", per_class=1)
    db = tmp_path / "w.duckdb"
    args = ["run", str(root), "--models", make_checkpoint(tmp_path / "m.pth"), "--db", str(db), "-q"]
    args += ["--workers", "0", "--backend", "torch"]
    monkeypatch.setattr(_io, "_fault", _enospc)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("audit: error:") == 1 and "No space left on device" in err and "Traceback" not in err
    assert _runs(db) == ["failed"], "a run that raised is never left running"
    monkeypatch.setattr(_io, "_fault", None)
    assert main(args) == 0
    assert _runs(db) == ["failed", "finished"]


def test_a_full_disk_at_the_final_commit_is_one_line_and_keeps_the_last_good_state(workspace, capsys, monkeypatch):
    import duckdb

    from audit import pipeline, store
    from audit.cli import main

    ds, db, preds = workspace
    with connect(db, read_only=True) as con:
        before = con.execute("SELECT * FROM predictions ORDER BY model, image_index").fetchall()
        flags = con.execute("SELECT * FROM label_issues ORDER BY image_index").fetchall()
    real_ingest, armed = pipeline._ingest, []

    def ingest(*a, **k):
        armed.append(True)
        return real_ingest(*a, **k)

    def commit(con):
        if armed:
            raise duckdb.TransactionException(
                f'TransactionContext Error: Failed to commit: Could not write file "{db}.wal": No space left on device'
            )
        con.execute("COMMIT")

    monkeypatch.setattr(pipeline, "_ingest", ingest)
    monkeypatch.setattr(store, "_commit", commit)
    rerun = ["run", str(ds.root), "--models", f"preds:{preds}", "--db", str(db), "-q"]
    assert main(rerun) == 2
    err = capsys.readouterr().err
    assert err.count("audit: error:") == 1 and "No space left on device; free some disk space" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT * FROM predictions ORDER BY model, image_index").fetchall() == before
        assert con.execute("SELECT * FROM label_issues ORDER BY image_index").fetchall() == flags
    assert _runs(db) == ["finished", "failed"]
    assert main(rerun) == 0
    assert _runs(db) == ["finished", "failed", "finished"]


# A real refused write, not a mock: from the final write on, the OS lets this process grow no file
# (RLIMIT_FSIZE 0, SIGXFSZ ignored, so writes fail with EFBIG), as a full disk refuses them.
_NO_MORE_WRITES_AT_THE_FINAL_WRITE = """
    import resource, signal
    from audit import pipeline
    _ingest = pipeline._ingest
    def ingest(*a, **k):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return _ingest(*a, **k)
    pipeline._ingest = ingest
"""


def test_a_real_refused_write_at_the_final_commit_is_one_line_and_the_workspace_stays_consistent(workspace, capsys):
    from audit.cli import main

    ds, db, preds = workspace
    with connect(db, read_only=True) as con:
        before = con.execute("SELECT * FROM predictions ORDER BY model, image_index").fetchall()
    rerun = ["run", str(ds.root), "--models", f"preds:{preds}", "--db", str(db), "-q"]
    res = _cli(*rerun, code=_NO_MORE_WRITES_AT_THE_FINAL_WRITE)
    _error_line(res, "File too large")
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT * FROM predictions ORDER BY model, image_index").fetchall() == before
    assert _runs(db)[0] == "finished" and _runs(db)[1] in ("running", "failed")  # "running" if even that was refused
    assert main(rerun) == 0, capsys.readouterr().err
    assert _runs(db)[1:] in (["interrupted", "finished"], ["failed", "finished"])


def test_a_full_disk_during_export_is_one_line_and_keeps_the_last_export(workspace, tmp_path, capsys, monkeypatch):
    from audit import _io
    from audit.cli import main

    _, db, _ = workspace
    out = tmp_path / "out"
    assert main(["export", "--db", str(db), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    append_decision(db, 3, "relabel", labels=[2], reviewer="t")
    capsys.readouterr()
    monkeypatch.setattr(_io, "_fault", _enospc)
    assert main(["export", "--db", str(db), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("audit: error:") == 1 and "No space left on device" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
