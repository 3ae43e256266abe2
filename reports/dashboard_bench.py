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
import contextlib
import json
import math
import os
import platform
import shutil
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


DESIGN = """## Pages

`audit dashboard --db WORKSPACE` (127.0.0.1:8501). The URL keeps the page and the image under review
(`?page=review&image=939`).

1. **Overview**: images, classes, models, bad images, flagged, reviewed; the metrics table (models x original /
   ReaL / sigmoid / clean / relabeled, 95% intervals); accuracy per model per evaluation with interval bars; the
   rank of each model under each evaluation, and which evaluations reorder them.
2. **Disagreements**: a gallery of 24 thumbnails a page, filtered by kind (flagged by cleanlab, a model vs the given
   label, models vs each other, a model vs ReaL), cleanlab issue kind, model, class, label-quality range and review
   state, in five sort orders; each card shows the given label, the ReaL labels, every model's top-3 with
   probabilities, the label quality and the suggestion. "Confused classes": the class pairs a model mixes up most,
   as a table and a chart, each openable in the gallery.
3. **Map**: every image a point of a 2-D map of one model's features (seeded UMAP after a PCA to 50, stored by
   `audit run` or `audit map`), coloured by given or current label, flags, any check, reviewed or confidence;
   the gallery filter's images outlined; a lasso, box or click shows the selected images as cards and sends them
   to the review queue or the gallery; resting the pointer on a point shows its thumbnail. Drawn on a 2-D
   canvas (no WebGL needed); timings below ("Map page at 50,000 points").
4. **Review**: one image large, its queue position and neighbours (the queue is the gallery's filter and order);
   accept the suggestion (A), keep the original (K), no class fits (N), undo (U), relabel with a class search by
   name or wnid (Ctrl+Enter), several valid labels (Ctrl+M), previous / next (arrow keys); a reason field; the
   image's full decision history. Each action appends one decision (reviewer, UTC time, reason) and moves on.
   Below: its nearest images in feature space (8 by default, up to 20), duplicate partners first and marked, each
   with its current label and cosine similarity and an Open button, under a line such as "6 of 8 neighbours
   labelled pot".
5. **Duplicates**: the duplicate groups (within the set, and copies of a reference training set when one was
   given) side by side with each image's label, unresolved and label-differing groups first; one click resolves a
   group (keep all, exclude the copies from evaluation, or one label for the group), through the same decision log.
6. **Impact**: decisions, images reviewed, flags reviewed, accepted, rejected, flag precision (share of reviewed
   flags whose label set changed) with its interval; per model original vs relabeled vs ReaL top-1, deltas and
   rank changes, as a table and a chart; the latest decisions.
7. **Export**: the counts `audit export` reports and each export file (and a zip of all) as a download, built by
   `audit.export` when clicked.

## How the dashboard stays fast

* Every query is SQL in DuckDB (`audit/queries.py`); pandas only ever holds a page of results (24 cards, one
  image, one row per model). Sort orders and filters are fixed SQL fragments chosen by key; every value is a
  bound parameter.
* What only `audit run` changes (each image's label, ReaL set, cleanlab columns, every model's top-1 and the
  any-model disagreement flags; each model's relabeled hit counts under the given labels) is read once per run
  into an in-memory Arrow table and scanned by DuckDB beside the live `decisions` table. The relabeled metric is
  those counts corrected on the decided images only, so its cost follows the number of decisions.
* Streamlit caches each query per (arguments, data version); the data version is a `stat` of the DuckDB file,
  its WAL and the neighbours file, so a decision written here, by another reviewer or by `audit review`, and a finished
  `audit run`, show on the next rerun, and an idle rerun opens nothing.
* Neighbours are not searched per click: `audit run` stores each image's 20 nearest (the checks' shared exact
  cosine graph) in `<db>.arrays/neighbours.npz`, read once per version of the file; one image's answer is a row
  of it plus four small queries (~18 ms median on 50,000 images with 2,000 decisions; writing the file at the end
  of a 50,000-image run ~0.1 s; measured on the 2 shared cores).
* Thumbnails: Pillow with draft decoding, cached on disk beside the workspace (`<db>.thumbs/`, keyed by id,
  size, mtime and length) and in memory.

## Sharing one workspace: dashboard, `audit run`, `audit export`, reviewers

DuckDB lets one process at a time open a file for writing, and while it does no other process can open it.
So nothing holds the file:

* Every dashboard read opens the file read-only, runs the page's queries and closes it before the page is
  sent (`audit.queries.Reader`); no connection outlives a script run. A read finding the file locked retries
  with backoff (`audit.store.connect`); after 3 s the page shows the data it last read with a notice, and
  catches up on the next rerun. A rerun whose data version has not changed reads nothing at all, so an
  uncommitted `audit run` transaction never blocks it.
* Each decision is one short write transaction (`audit.store.append_decision`, via
  `audit.queries.record_decision`), retried for up to 30 s, so it lands after an `audit run` ingest instead of
  failing; `audit run` retries the same way around a decision or a page read. `audit export` only reads.
* Within the Streamlit server (one process for every browser session) DuckDB refuses a read-write and a
  read-only connection to the same file at once, so all of the dashboard's opens and writes go through one
  process-wide lock (`audit.queries.DB_LOCK`).
* Decisions are append-only and keyed by a sequence; undo is a new decision. Two reviewers never overwrite
  each other: the latest decision per image wins, and every earlier one stays in the image's history.

Tested in `tests/test_queries.py` and `tests/test_app.py`: reads wait out a process holding the write lock;
a page shows its last data while the lock is held; decisions saved while another process runs `audit run`
land and the run finishes; two reviewer processes and server threads reading and writing together lose
nothing; a decision written by another process shows on the next rerun.

## Only images under the dataset root

The workspace comes from `AUDIT_DB` (set by `audit dashboard --db`), never from the URL; the URL carries only
the page name and an image index. An image's path is its `image_id` under `meta.dataset_root`;
`audit.dashboard.thumbs.safe_image_path` refuses empty ids, NUL bytes, backslashes, absolute paths, `..` and
any id whose resolved path (symlinks followed) is not a file inside the resolved root. `audit dashboard`
binds 127.0.0.1 unless `--host` says otherwise.

## Screenshots

`reports/screenshots/`, taken by `reports/dashboard_bench.py --screenshots` in headless Chromium on a copy of
the audited 1,300-image ILSVRC-2012 sample (EfficientNet-Lite0/1/2): the overview, the disagreement gallery,
the confused class pairs, a flagged image before and after its review, the impact of that decision, and the
export page.
"""


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


def _write_features(path: Path, true_of_id: np.ndarray, seed: int, d: int = 256) -> None:
    """(N, d) float16 features beside a logits file (``<stem>.features.npy``): clustered by true class, as a
    network's penultimate layer is, so the map, the neighbours and the feature checks have structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (N_CLASSES, d)).astype(np.float32)
    out = np.lib.format.open_memmap(path.with_name(path.stem + ".features.npy"), "w+", np.float16, (len(true_of_id), d))
    for s in range(0, len(true_of_id), CHUNK):
        t = true_of_id[s : s + CHUNK]
        out[s : s + len(t)] = np.maximum(centres[t] + rng.normal(0.0, 1.0, (len(t), d)).astype(np.float32), 0)
    out.flush()
    del out


def generate(base: Path, n: int = 50_000, seed: int = 0, *, features: bool = False) -> tuple[Path, dict[str, float]]:
    """Make (or reuse) the synthetic dataset and workspace under ``base``; return the DB and step timings.

    ``features``: each model's prediction file also carries features (so the run stores a map and neighbours).
    """
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
        if features and not f.with_name(f.stem + ".features.npy").exists():
            _write_features(f, true[idx], seed + 20 + k)
        specs.append(resolve_model(f"preds:{f}"))
    times["logits"] = time.perf_counter() - t
    t = time.perf_counter()
    run_audit(ds, specs, db, progress=False)
    times["run_audit"] = time.perf_counter() - t
    (base / "generate_times.json").write_text(json.dumps(times, indent=1))
    return db, times


# --------------------------------------------------------------------------- bench

BAR = 1.0  # seconds: every interaction answers within this


def _seed_decisions(db: Path, n: int) -> int:
    """Bulk-insert ``n`` review decisions on the worst flagged images (a review well under way)."""
    from audit.store import connect

    with connect(db) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            """
            INSERT INTO decisions (image_index, image_id, old_labels, new_labels, action, reviewer, decided_at, reason)
            SELECT image_index, image_id, [label],
                   CASE WHEN k % 4 = 0 THEN [label] ELSE [suggested_label] END,
                   CASE WHEN k % 4 = 0 THEN 'keep' ELSE 'accept' END, 'seed', now()::TIMESTAMP, 'benchmark seed'
            FROM (SELECT i.image_index, i.image_id, i.label, li.suggested_label,
                         row_number() OVER (ORDER BY li.label_quality) AS k
                  FROM label_issues li JOIN images i USING (image_index) WHERE li.is_label_issue)
            WHERE k <= ?
            """,
            [n],
        )
        con.execute("COMMIT")
        return int(con.execute("SELECT count(*) FROM decisions").fetchall()[0][0])


def _time(fn: Callable[[], Any], reps: int) -> tuple[float, float, float]:
    """(first call, median and max of the next ``reps`` calls), seconds."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    rest = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        rest.append(time.perf_counter() - t)
    return first, statistics.median(rest) if rest else first, max(rest) if rest else first


def _query_timings(db: Path) -> tuple[list[tuple[str, str, float, float, float]], float]:
    from audit import queries as q
    from audit.dashboard.thumbs import thumb_dir, thumbnail

    q._RUNS.clear()
    t = time.perf_counter()
    with q.Reader(db) as r:
        q._run(r.connection(), db)
    facts = time.perf_counter() - t
    f0 = q.Filters()
    fall = q.Filters(kinds=("label", "models", "real"), reviewed="all", sort="disagree")
    _, head = q.gallery(db, f0, 0, 24)
    one = int(head.image_index.iloc[3])
    summary = q.run_summary(db)
    root, ids = summary["dataset_root"], head.image_id.tolist()
    cache = thumb_dir(db)
    shutil.rmtree(cache, ignore_errors=True)
    model = q.model_names(db)[1]
    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("Overview", "run_summary", lambda: q.run_summary(db)),
        ("Overview", "metrics_table (relabeled live)", lambda: q.metrics_table(db)),
        ("Disagreements", "gallery: flagged, unreviewed, page 1", lambda: q.gallery(db, f0, 0, 24)),
        ("Disagreements", "gallery: any disagreement, page 50", lambda: q.gallery(db, fall, 49, 24)),
        (
            "Disagreements",
            f"gallery: {model} vs label/ReaL, quality 0.1-0.6",
            lambda: q.gallery(db, q.Filters(kinds=("label", "real"), model=model, quality=(0.1, 0.6)), 0, 24),
        ),
        ("Disagreements", "gallery: one class", lambda: q.gallery(db, q.Filters(kinds=(), class_index=7), 0, 24)),
        ("Disagreements", "confused_pairs (ensemble)", lambda: q.confused_pairs(db, "ensemble", 25)),
        ("Disagreements", "classes + model_names", lambda: (q.classes(db), q.model_names(db))),
        (
            "Disagreements",
            "24 thumbnails, disk cache cold then warm",
            lambda: [thumbnail(root, i, 192, cache=cache) for i in ids],
        ),
        ("Review", "queue_window", lambda: q.queue_window(db, f0, one)),
        ("Review", "image_detail", lambda: q.image_detail(db, one)),
        ("Review", "record_decision (write)", lambda: q.record_decision(db, one, "keep", reviewer="bench")),
        ("Impact", "decision_counts", lambda: q.decision_counts(db)),
        ("Impact", "recent_decisions", lambda: q.recent_decisions(db, 50)),
        ("Export", "export_summary", lambda: q.export_summary(db)),
    ]
    rows = []
    for page, name, fn in cases:
        first, med, mx = _time(fn, 5)
        rows.append((page, name, first, med, mx))
        print(f"query {page:13s} {name:48s} {first:.3f} {med:.3f} {mx:.3f}", file=sys.stderr)
    return rows, facts


def _apptest_timings(db: Path) -> tuple[list[tuple[str, str, float]], float]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from audit import queries as q

    os.environ["AUDIT_DB"] = str(db)
    os.environ["AUDIT_REVIEWER"] = "bench"
    q._RUNS.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    rows: list[tuple[str, str, float]] = []

    def run(page: str, what: str, step: Callable[[], Any], *, clear: bool = True) -> None:
        if clear:
            st.cache_data.clear()  # as after any decision: every query of the page runs again
        t = time.perf_counter()
        step()
        took = time.perf_counter() - t
        if at.exception:
            raise RuntimeError(f"{page} / {what}: {[e.value for e in at.exception]}")
        rows.append((page, what, took))
        print(f"app   {page:13s} {what:60s} {took:.3f}", file=sys.stderr)

    def page(name: str) -> Callable[[], Any]:
        return lambda: at.sidebar.radio(key="page").set_value(name).run()

    for _ in range(3):
        for name in ("Overview", "Disagreements", "Review", "Impact", "Export"):
            run(name, "open page, every query re-run", page(name))
    run("Export", "rerun, nothing changed (cached)", at.run, clear=False)
    run("Disagreements", "open page", page("Disagreements"))
    run(
        "Disagreements",
        "filter: any disagreement, all images",
        lambda: (
            at.multiselect(key="f_kinds").set_value(["label", "models", "real"]),
            at.radio(key="f_reviewed").set_value("all"),
            at.run(),
        ),
    )
    run(
        "Disagreements", "sort: most models disagreeing", lambda: at.selectbox(key="f_sort").set_value("disagree").run()
    )
    run("Disagreements", "gallery page 40", lambda: at.number_input(key="g_page").set_value(40).run())
    run("Disagreements", "filter: model", lambda: at.selectbox(key="f_model").set_value(q.model_names(db)[0]).run())
    run("Disagreements", "filter: class", lambda: at.selectbox(key="f_class").set_value(7).run())
    run(
        "Disagreements", "filter: label quality 0.1-0.5", lambda: at.slider(key="f_quality").set_value((0.1, 0.5)).run()
    )
    run(
        "Disagreements",
        "reset to flagged, unreviewed",
        lambda: (
            at.multiselect(key="f_kinds").set_value(["flagged"]),
            at.radio(key="f_reviewed").set_value("unreviewed"),
            at.selectbox(key="f_class").set_value(None),
            at.selectbox(key="f_model").set_value(None),
            at.slider(key="f_quality").set_value((0.0, 1.0)),
            at.selectbox(key="f_sort").set_value("quality"),
            at.run(),
        ),
    )
    # A card's Review button: the gallery is one strip (audit.dashboard.strip), clicked as the browser does, through
    # its open trigger (the tests' helper).
    sys.path.insert(0, str(ROOT / "tests"))
    from test_app import click_strip, strip_cards

    first = strip_cards(at, "g_strip")[0]["idx"]
    run("Review", "open an image from its card", lambda: click_strip(at, "g_strip", first))
    run(
        "Review",
        "accept suggestion (write + next image)",
        lambda: at.button(key="do_accept").click().run(),
        clear=False,
    )
    run("Review", "keep original (write + next image)", lambda: at.button(key="do_keep").click().run(), clear=False)
    img = at.session_state["image"]
    # Class 5 may not be among the likely classes the picker offers: pick from all of them, as a reviewer would.
    at.toggle(key="all_classes").set_value(True).run()

    def relabel() -> None:
        at.selectbox(key=f"relabel_to_{img}").set_value(5)
        next(b for b in at.button if b.label == "Relabel").click().run()

    run("Review", "relabel via class search (write + next)", relabel, clear=False)
    run(
        "Review",
        "next image",
        lambda: next(b for b in at.button if b.label.startswith("Next")).click().run(),
        clear=False,
    )
    at.toggle(key="advance").set_value(False).run()
    run(
        "Review",
        "no class fits, staying on the image (write)",
        lambda: at.button(key="do_nofit").click().run(),
        clear=False,
    )
    run("Review", "undo (write)", lambda: at.button(key="do_undo").click().run(), clear=False)
    run("Impact", "open page after the decisions", page("Impact"), clear=False)
    run("Export", "open page", page("Export"), clear=False)
    return rows, first


def cpu_reference(rounds: int = 3) -> float:
    """Seconds of a fixed pure-Python loop (the sum of squares below 10^7), best of ``rounds``: the same code's
    figures moved ~2x between sessions on this project's shared machine, and this says which machine a report
    was measured on."""
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        sum(i * i for i in range(10**7))
        best = min(best, time.perf_counter() - t)
    return best


def _machine() -> str:
    import duckdb
    import streamlit

    cpu, mem = "?", "?"
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
        kb = next(
            (int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
            0,
        )
        mem = f"{kb / 2**20:.0f} GiB"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem} RAM; {platform.platform()}; Python {platform.python_version()}, "
        f"DuckDB {duckdb.__version__}, Streamlit {streamlit.__version__}"
    )


def bench(db: Path, gen_times: dict[str, float], a: argparse.Namespace) -> int:
    from audit import queries as q

    work = db.with_name("bench.duckdb")
    for p in (work, work.with_name(work.name + ".wal")):
        p.unlink(missing_ok=True)
    shutil.copy(db, work)
    load0 = os.getloadavg()
    n_dec = _seed_decisions(work, 500)
    s = q.run_summary(work)
    t = time.perf_counter()
    export_build = None
    if not a.skip_export:
        q.export_files(work)
        export_build = time.perf_counter() - t
    qrows, facts = _query_timings(work)
    arows, first = _apptest_timings(work)
    load1 = os.getloadavg()
    saved = db.parent / "generate_times.json"
    gen = gen_times or (json.loads(saved.read_text()) if saved.exists() else {})
    worst_q = max(r[3] for r in qrows)
    worst_a = max(r[2] for r in arows)
    md = _report(db, s, n_dec, gen, facts, qrows, arows, first, export_build, (load0, load1), worst_q, worst_a)
    OUT_MD.write_text(md + _kept_section())
    print(
        f"wrote {OUT_MD}; slowest warm query {worst_q:.3f}s, slowest page/interaction {worst_a:.3f}s", file=sys.stderr
    )
    return 0 if worst_a <= BAR else 1


def _report(db, s, n_dec, gen, facts, qrows, arows, first, export_build, loads, worst_q, worst_a) -> str:
    ok = "meets" if worst_a <= BAR else "MISSES"
    lines = [
        "# Dashboard: design, timings, screenshots",
        "",
        "Generated by `reports/dashboard_bench.py` (timings part); rerun it to refresh.",
        "",
        "```bash",
        ".venv/bin/python reports/dashboard_bench.py                    # 50,000 x 3 x 1,000 timings -> this file",
        ".venv/bin/python reports/dashboard_bench.py --screenshots DB   # page screenshots -> reports/screenshots/",
        "```",
        "",
        f"## 50,000-image timings: {ok} the {BAR:.0f} s bar",
        "",
        f"Machine: {_machine()}. Load average {loads[0][0]:.1f} at the start, {loads[1][0]:.1f} at the end "
        "(other jobs shared these cores; every figure below is wall-clock time under that load). CPU reference "
        f"(Python's `sum(i * i for i in range(10**7))`, best of 3): {cpu_reference():.2f} s; the machine's speed has "
        "varied ~2x between sessions, so compare reports by it.",
        "",
        f"Workspace: synthetic, {s['images']:,} images x {len(s['models'])} models x {s['classes']:,} classes "
        f"(`{db}`), {s['flagged']:,} flagged by cleanlab, {n_dec:,} review decisions seeded before timing. "
        "Images are 64x48 JPEGs named `ILSVRC2012_val_XXXXXXXX.JPEG` (so timm's ReaL labels attach); each "
        "image's true class is its first ReaL label, 3% of given labels are flipped, and three models of 72-80% "
        "top-1 confuse neighbouring classes. Logits are written as `preds:` `.npy` files in 5,000-row chunks and "
        "ingested by `audit.pipeline.run_audit`.",
        "",
    ]
    if gen:
        lines += [
            "Generator (once; reused while the workspace exists): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in gen.items())
            + ". `run_audit`'s post-processing of 50,000 x 3 x 1,000 (import, top-k, evaluations, cleanlab, "
            "one ingest transaction) is the bulk of it.",
            "",
        ]
    lines += [
        "### Every page and interaction, rendered by Streamlit's AppTest",
        "",
        "Server-side time of one script run (all queries, thumbnails from the disk cache, the page's element "
        'tree); the browser adds its own drawing. "every query re-run" clears Streamlit\'s cache first, as '
        "any decision does (the data version changes); pages were opened three times each.",
        "",
        "| page | interaction | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {p} | {w} | {t:.3f} |" for p, w, t in arows]
    lines += [
        "",
        f"Slowest: **{worst_a:.3f} s**. The first run of a fresh server process took {first:.1f} s "
        f"(Python imports, and the per-run facts built once: {facts:.2f} s on their own).",
        "",
        "### The queries behind them (DuckDB, one connection per call)",
        "",
        "| page | query | first call | median of 5 | max of 5 |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {p} | {n} | {f:.3f} | {m:.3f} | {x:.3f} |" for p, n, f, m, x in qrows]
    lines += [
        "",
        f"Slowest warm query: {worst_q:.3f} s. Opening the DuckDB file costs a few tens of ms per call; a page "
        "render opens it once (`audit.queries.Reader`) for all its queries.",
        "",
    ]
    if export_build is not None:
        lines += [
            f"Export: building the five export files for 50,000 images takes **{export_build:.1f} s** "
            "(`audit.export.cleaned_labels` + `render_exports`, the code `audit export` runs). The Export page "
            "itself answers at once (counts come from SQL) and builds the files only when a download button "
            "is clicked, in Streamlit's download thread, so no other interaction waits on it.",
            "",
        ]
    lines += [DESIGN]
    return "\n".join(lines) + "\n"


MAP_BEGIN, MAP_END = "<!-- map-bench: begin -->", "<!-- map-bench: end -->"


def _kept_section() -> str:
    """The Map page's section (written by reports/map_bench.py), carried over when this bench rewrites the file."""
    old = OUT_MD.read_text() if OUT_MD.exists() else ""
    if MAP_BEGIN in old and MAP_END in old:
        return "\n" + old[old.index(MAP_BEGIN) : old.index(MAP_END) + len(MAP_END)] + "\n"
    return ""


def _finished(db: Path) -> bool:
    if not db.exists():
        return False
    from audit.store import connect

    with connect(db, read_only=True) as con:
        return bool(con.execute("SELECT count(*) FROM runs WHERE status = ?", ["finished"]).fetchall()[0][0])


# --------------------------------------------------------------------------- screenshots

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
MAX_PNG = 300_000


def _save_png(data: bytes, path: Path) -> int:
    """Write a screenshot as a palette PNG under MAX_PNG bytes (shrinking it if it must)."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    while True:
        buf = io.BytesIO()
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_PNG or im.width < 600:
            path.write_bytes(buf.getvalue())
            return buf.tell()
        im = im.resize((int(im.width * 0.85), int(im.height * 0.85)), Image.Resampling.LANCZOS)


def _settle(page: Any, ms: int = 800) -> None:
    """Wait until Streamlit has finished running and every image and chart has drawn."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')"
        " && Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000,
    )
    page.wait_for_timeout(ms)


def screenshots(db: Path) -> int:
    """Screenshots of every page on a copy of ``db`` (decisions made for them stay out of the original)."""
    import re
    import tempfile

    from playwright.sync_api import sync_playwright

    from audit.dashboard.serve import serve

    if not Path("/usr/bin/chromium").exists():
        print("no /usr/bin/chromium; apt-get install chromium", file=sys.stderr)
        return 2
    SHOTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="audit-shots-"))
    copy = tmp / db.name
    shutil.copy(db, copy)
    out: list[tuple[str, int]] = []
    with serve(copy, log=tmp / "streamlit.log", env={"AUDIT_REVIEWER": "screenshot"}) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1400})
        page.set_default_timeout(120_000)

        def shot(name: str, full: bool = True) -> None:
            _settle(page)
            size = _save_png(page.screenshot(full_page=full), SHOTS / f"{name}.png")
            out.append((name, size))
            print(f"{name}.png {size / 1000:.0f} KB", file=sys.stderr)

        def sidebar(name: str) -> None:
            page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()

        page.goto(f"{url}/?page=overview")
        page.get_by_role("heading", name="Overview").wait_for()
        page.wait_for_selector(".vega-embed", timeout=60_000)
        shot("1-overview")
        sidebar("Disagreements")
        page.get_by_role("heading", name="Disagreements").wait_for()
        shot("2-disagreements", full=False)
        page.get_by_text("Confused classes", exact=True).click()
        page.wait_for_timeout(500)
        shot("3-confused-classes", full=False)
        sidebar("Review")
        page.get_by_role("heading", name="Review").wait_for()
        shot("4-review")
        shown = re.search(r"image #(\d+)", page.get_by_text(re.compile(r"· image #\d+")).inner_text()).group(1)
        page.get_by_role("button", name=re.compile(r"^Accept")).click()
        page.get_by_text(re.compile(r"Decision \d+ saved")).wait_for()
        page.goto(f"{url}/?page=review&image={shown}")  # the decided image, with its history
        page.get_by_text(re.compile(r"current labels: .* — reviewed")).wait_for()
        shot("5-review-decided")
        sidebar("Impact")
        page.get_by_role("heading", name="Impact of the review").wait_for()
        shot("6-impact")
        sidebar("Export")
        page.get_by_role("heading", name="Export the cleaned labels").wait_for()
        shot("7-export")
        browser.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print("saved " + ", ".join(f"{n}.png ({s / 1000:.0f} KB)" for n, s in out) + f" in {SHOTS}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/audit-bench50k", help="folder for the synthetic dataset and workspace")
    ap.add_argument("--n", type=int, default=50_000, help="images (at most 50,000: ILSVRC-2012 val names)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--screenshots", metavar="DB", help="save page screenshots of workspace DB into reports/")
    ap.add_argument("--skip-export", action="store_true", help="do not time the export build")
    a = ap.parse_args(argv)
    if a.screenshots:
        return screenshots(Path(a.screenshots))
    t = time.perf_counter()
    db, gen_times = generate(Path(a.dir), a.n)
    if gen_times:  # empty when an existing workspace was reused
        gen_times["total"] = time.perf_counter() - t
    print(f"workspace {db}: " + ", ".join(f"{k} {v:.1f}s" for k, v in gen_times.items()), file=sys.stderr)
    if a.generate_only:
        return 0
    return bench(db, gen_times, a)


if __name__ == "__main__":
    sys.exit(main())
