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
