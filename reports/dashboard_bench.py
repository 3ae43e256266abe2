"""Dashboard timings on a synthetic 50,000-image x 3-model x 1,000-class run.

Three steps, each reusable on its own:

1. ``generate``: a synthetic ILSVRC-2012-shaped dataset (50,000 tiny JPEGs named
   ``ILSVRC2012_val_XXXXXXXX.JPEG`` in wnid folders, so timm's ReaL labels attach)
   and three models' logits as ``preds:`` ``.npy`` files written in chunks; then
   :func:`audit.pipeline.run_audit` ingests them into a workspace. Reused when
   the workspace already exists.
2. ``bench``: times every query each dashboard page runs (cold and warm) and an
   ``AppTest`` render of each page, plus a review action (write + rerender), on
   that workspace; writes ``reports/DASHBOARD.md``.
3. ``--screenshots DB``: serves the app on a localhost port for workspace DB and
   saves a screenshot of each page (and of a review) into ``reports/screenshots/``
   with headless Chromium.

Usage::

    .venv/bin/python reports/dashboard_bench.py [--dir /tmp/audit-bench50k] [--n 50000]
    .venv/bin/python reports/dashboard_bench.py --screenshots reports/audit.duckdb
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT_MD = ROOT / "reports" / "DASHBOARD.md"
SHOTS = ROOT / "reports" / "screenshots"
N_CLASSES = 1000
CHUNK = 5000
MODELS = ("alpha", "beta", "gamma")
# Per model: P(top-1 = the image's true class), P(top-1 = a confusable neighbour class);
# the rest is a random class. Gives ~75-85% top-1 and model-specific confusions.
SKILL = {"alpha": (0.80, 0.10), "beta": (0.76, 0.12), "gamma": (0.72, 0.14)}
FLIP = 0.03  # fraction of given labels replaced by a random wrong class


# --------------------------------------------------------------------------- generate


def _truth(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """True class of each image (its first ReaL label where there is one) and its given label."""
    from audit.datasets import load_real_labels

    real, _ = load_real_labels()
    true = rng.integers(0, N_CLASSES, n)
    for i in range(n):
        if real[i]:
            true[i] = real[i][0]
    given = true.copy()
    flip = rng.random(n) < FLIP
    given[flip] = (true[flip] + rng.integers(1, N_CLASSES, int(flip.sum()))) % N_CLASSES
    return true, given


def _write_images(root: Path, given: np.ndarray, wnids: tuple[str, ...]) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    base = rng.integers(40, 215, (N_CLASSES, 3))
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, :, None]
    for w in {wnids[c] for c in given}:
        (root / w).mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(given.tolist()):
        path = root / wnids[c] / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        if path.exists():
            continue
        col = base[c].astype(np.float32)
        arr = np.clip(col * (0.6 + 0.6 * ramp) + (i % 37), 0, 255).astype(np.uint8)
        arr = np.broadcast_to(arr, (48, 64, 3))
        Image.fromarray(np.ascontiguousarray(arr)).save(path, quality=80)


def _write_logits(path: Path, ids: list[str], true_of_id: np.ndarray, seed: int, skill: tuple[float, float]) -> None:
    """(N, C) float32 logits written chunk by chunk into an .npy file (never all in memory at once)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, N_CLASSES))
    p_true, p_near = skill
    for s in range(0, n, CHUNK):
        t = true_of_id[s : s + CHUNK]
        m = len(t)
        x = rng.normal(0.0, 1.0, (m, N_CLASSES)).astype(np.float32)
        u = rng.random(m)
        target = np.where(
            u < p_true, t, np.where(u < p_true + p_near, (t + 1) % N_CLASSES, rng.integers(0, N_CLASSES, m))
        )
        x[np.arange(m), target] += rng.uniform(4.0, 10.0, m).astype(np.float32)
        # A runner-up, so top-3 lists look like a model's.
        x[np.arange(m), (target + 1 + (u < 0.5)) % N_CLASSES] += 3.0
        out[s : s + m] = x
    out.flush()
    del out
    path.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")


def generate(base: Path, n: int = 50_000, seed: int = 0) -> tuple[Path, dict[str, float]]:
    """Make (or reuse) the synthetic dataset and workspace under ``base``; return the DB and step timings."""
    from audit.datasets import imagenet_label_space, load_dataset
    from audit.pipeline import run_audit
    from audit.zoo import resolve_model

    db = base / "workspace.duckdb"
    times: dict[str, float] = {}
    if _finished(db):
        return db, times
    import shutil

    for p in (db, db.with_name(db.name + ".wal")):
        p.unlink(missing_ok=True)
    shutil.rmtree(db.with_name(db.name + ".arrays"), ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = imagenet_label_space().keys
    t = time.perf_counter()
    true, given = _truth(n, rng)
    root = base / "ds" / "val"
    _write_images(root, given, wnids)
    times["images"] = time.perf_counter() - t
    t = time.perf_counter()
    ds = load_dataset(base / "ds")
    times["load_dataset"] = time.perf_counter() - t
    # ds.image_ids are sorted by path; map each back to its ILSVRC index for its true class.
    idx = np.array([int(Path(i).stem.rsplit("_", 1)[1]) - 1 for i in ds.image_ids])
    t = time.perf_counter()
    specs = []
    for k, name in enumerate(MODELS):
        f = base / f"{name}.npy"
        if not f.exists():
            _write_logits(f, list(ds.image_ids), true[idx], seed + 10 + k, SKILL[name])
        specs.append(resolve_model(f"preds:{f}"))
    times["logits"] = time.perf_counter() - t
    t = time.perf_counter()
    run_audit(ds, specs, db, progress=False)
    times["run_audit"] = time.perf_counter() - t
    return db, times


def _finished(db: Path) -> bool:
    if not db.exists():
        return False
    from audit.store import connect

    with connect(db, read_only=True) as con:
        return bool(con.execute("SELECT count(*) FROM runs WHERE status = ?", ["finished"]).fetchall()[0][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/audit-bench50k", help="folder for the synthetic dataset and workspace")
    ap.add_argument("--n", type=int, default=50_000, help="images (at most 50,000: ILSVRC-2012 val names)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--screenshots", metavar="DB", help="save page screenshots of workspace DB into reports/")
    a = ap.parse_args(argv)
    if a.screenshots:
        return screenshots(Path(a.screenshots))
    t = time.perf_counter()
    db, gen_times = generate(Path(a.dir), a.n)
    gen_times["total"] = time.perf_counter() - t
    print(f"workspace {db}: " + ", ".join(f"{k} {v:.1f}s" for k, v in gen_times.items()), file=sys.stderr)
    if a.generate_only:
        return 0
    return bench(db, gen_times, a)


if __name__ == "__main__":
    sys.exit(main())
