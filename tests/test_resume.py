"""``audit run`` killed with SIGKILL mid-scoring resumes, recomputes nothing finished, and ends byte-identical."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _synth import make_imagefolder

from audit.datasets import load_dataset
from audit.scoring import load_pixel_stats
from audit.store import arrays_dir, connect

ROOT = Path(__file__).resolve().parents[1]
SHARD = 4
N_IMAGES = 64  # 16 shards: scoring takes seconds, so the kill lands mid-scoring


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    import torchvision

    d = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    ckpt = d / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    root = make_imagefolder(d / "ds", per_class=N_IMAGES // 4, size=(96, 72))
    return d, root, f"resnet18@{ckpt}"


def _cmd(root: Path, model: str, db: Path) -> list[str]:
    return [sys.executable, "-m", "audit.cli", "run", str(root), "--models", model, "--db", str(db)]


def _env() -> dict[str, str]:
    return {**os.environ, "AUDIT_SHARD_SIZE": str(SHARD), "PYTHONUNBUFFERED": "1"}


def _run(root: Path, model: str, db: Path) -> None:
    args = [*_cmd(root, model, db), "--batch-size", "4", "--workers", "1"]
    res = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


def _shards(db: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (arrays_dir(db) / "shards").rglob("*.npz")}


def _children(pid: int) -> list[int]:
    out = []
    for t in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (t / "children").read_text().split()]
    return out


def _tables(db: Path) -> dict[str, list]:
    queries = {
        "images": "SELECT * FROM images ORDER BY image_index",
        "classes": "SELECT * FROM classes ORDER BY class_index",
        "predictions": "SELECT * FROM predictions ORDER BY model, image_index",
        "metrics": "SELECT * EXCLUDE (run_id) FROM metrics ORDER BY model, evaluation, metric",
        "label_issues": "SELECT * EXCLUDE (run_id) FROM label_issues ORDER BY image_index",
        "bad_images": "SELECT * EXCLUDE (run_id) FROM bad_images ORDER BY image_index",
        "models": "SELECT model, source, arch, num_classes, preprocess FROM models ORDER BY model",
    }
    with connect(db, read_only=True) as con:
        return {k: con.execute(q).fetchall() for k, q in queries.items()}


def test_kill_9_mid_scoring_then_resume_is_byte_identical(setup):
    d, root, model = setup
    ref, db = d / "ref.duckdb", d / "killed.duckdb"
    # Every run in its own process: OpenVINO never runs inside pytest (see test_score's skips).
    _run(root, model, ref)  # the uninterrupted run

    proc = subprocess.Popen(
        [*_cmd(root, model, db), "--batch-size", "4", "--workers", "1"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    n_shards = N_IMAGES // SHARD
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_shards(db)) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Its orphaned loader worker notices the dead parent within seconds and exits;
    # until then it still holds the fds it inherited (the workspace lock among them).
    gone = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < gone:
        time.sleep(0.1)
    done = _shards(db)
    assert 3 <= len(done) < n_shards, f"killed after {len(done)} of {n_shards} shards"
    assert not list(arrays_dir(db).glob("*.npy")), "killed before the matrices were assembled"

    _run(root, model, db)
    after = _shards(db)
    assert len(after) == n_shards
    for p, stamp in done.items():
        assert after[p] == stamp, f"finished shard {p.name} was recomputed"

    ref_npy = sorted(arrays_dir(ref).glob("*.npy"))
    got_npy = sorted(arrays_dir(db).glob("*.npy"))
    # Logits, probabilities and features (on by default), every one byte-identical.
    assert [p.name for p in ref_npy] == [p.name for p in got_npy] and len(ref_npy) == 3
    for a, b in zip(ref_npy, got_npy, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs after resume"
    shapes = {p.name.split(".")[-2]: np.load(p).shape for p in got_npy}
    assert shapes == {"features": (N_IMAGES, 512), "logits": (N_IMAGES, 1000), "probs": (N_IMAGES, 1000)}
    assert _tables(db) == _tables(ref)
    # Pixel statistics come from the same decode pass and resume with it: equal to the uninterrupted run's.
    ds = load_dataset(root)
    ref_px, got_px = load_pixel_stats(ds, arrays_dir(ref)), load_pixel_stats(ds, arrays_dir(db))
    assert ref_px is not None and got_px is not None and ref_px.keys() == got_px.keys()
    for k in ref_px:
        np.testing.assert_array_equal(got_px[k], ref_px[k], err_msg=k)
