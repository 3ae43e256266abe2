"""The Map page at 50,000 points: how long the map takes to compute, and every interaction in a real browser.

1. **Computing the map** (audit.featuremap.compute_map) on seeded synthetic features shaped as scoring
   stores them (float16, 1,280-d, clustered by 1,000 classes) at 10,000, 25,000 and 50,000 images, each
   in a fresh process (so UMAP's numba start-up counts, as it does in a run): seconds per step.
2. **The page**: the dashboard bench's synthetic 50,000-image x 3-model workspace
   (reports/dashboard_bench.py ``generate``, here with 256-d features per model, so ``audit run`` stores
   the map), served by ``audit dashboard``'s server and driven in headless Chromium, ``--rounds`` times over
   in one browser session: open the page, each colouring, the filter outline off and on, resting the pointer
   on points (their thumbnail cards), a lasso selection to its gallery, sending it to the review queue, back
   to the Map, then every other page from the sidebar. Each interaction is timed from the action until the
   script run it caused has ended and the page has drawn it (``RUN_WATCH`` counts ended runs in the page);
   the table gives each one's median and slowest, and the bar's verdict is the slowest of all.

Writes the section between the map-bench markers of reports/DASHBOARD.md (the dashboard bench keeps it)
and reports/perf_map.json.

    .venv/bin/python reports/map_bench.py [--dir /tmp/audit-bench50k-map] [--sizes 10000,25000,50000] [--rounds 3]
    .venv/bin/python reports/map_bench.py --skip-compute --rounds 5   # the page only (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "reports"))

import dashboard_bench as dbench  # noqa: E402

OUT_JSON = ROOT / "reports" / "perf_map.json"
BAR_COMPUTE = 120.0  # the bar: 50,000 points within 2 minutes
BAR_INTERACTION = 1.0  # ... and every interaction within 1 s
# Chromium as on a machine without a GPU: software compositing, no WebGL (the map is a 2-D canvas). With
# SwiftShader WebGL on (what plotly's Scattergl needed) every frame is composited through it: 2-4 s a rerun here.
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]


def _max_points() -> int:
    from audit.dashboard.mapfig import MAX_POINTS

    return MAX_POINTS


def _compute_child(n: int) -> dict[str, Any]:
    from audit.featuremap import compute_map

    rng = np.random.default_rng(0)
    d, c = 1280, 1000
    centres = rng.normal(0, 1, (c, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    x = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, 5000):
        e = min(n, s + 5000)
        x[s:e] = np.maximum(centres[y[s:e]] + rng.normal(0, 1, (e - s, d)).astype(np.float32), 0)
    t = time.perf_counter()
    _, info = compute_map(x)
    info["wall_s"] = round(time.perf_counter() - t, 2)
    return info


def compute_scaling(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True, cwd=ROOT
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        info["process_s"] = round(time.perf_counter() - t, 1)
        rows.append({"images": n, **info})
        print(f"map of {n:,}: {info['wall_s']} s (process {info['process_s']} s)", file=sys.stderr)
    return rows


# Counts the Streamlit script runs that have ended (stApp's data-test-script-state turning notRunning), so a timing
# waits for the run its own action caused. Until 2026-12-02 each timing began its wait with a fixed 150 ms pause (a
# run had to have started before "not running" meant anything); on an interaction whose action already waited for
# its result (a page change waits for the new page's heading), that pause was added to the figure.
RUN_WATCH = """
(() => {
  window.__auditRuns = 0;
  let last = null;
  const look = () => {
    const app = document.querySelector("[data-testid='stApp']");
    const s = app ? app.getAttribute('data-test-script-state') : null;
    if (s !== last) { if (s === 'notRunning' && last !== null) window.__auditRuns++; last = s; }
  };
  new MutationObserver(look).observe(document, {subtree: true, childList: true, attributes: true,
                                                attributeFilter: ['data-test-script-state']});
})();
"""

# The run counted has ended, and the page shows no running widget, no skeleton and no stale element of the last run.
# A running widget that is fading out is not waited for: Streamlit shows its "Running..." icon once a run has lasted
# 500 ms, and when the run ends fades it out over 200 ms before removing it (StatusWidget's CSSTransition, classes
# StatusWidget-exit*), with the page already drawn. Until 2026-12-02 the bench waited for that fade too, so any run
# over 0.5 s was timed up to 0.2 s longer than the reviewer waits.
_RUN_DONE = """n0 => window.__auditRuns > n0
  && document.querySelector("[data-testid='stApp'][data-test-script-state='notRunning']")
  && !document.querySelector(
       '[data-testid="stStatusWidget"]:not(.StatusWidget-exit):not(.StatusWidget-exit-active)')
  && !document.querySelector('[data-testid="stSkeleton"]')
  && !document.querySelector("[data-stale='true']")"""


def _runs(page: Any) -> int:
    return int(page.evaluate("window.__auditRuns"))


def _idle(page: Any, n0: int = -1) -> None:
    """Streamlit has finished a script run begun after ``n0`` runs had ended (-1: nothing is running), and the page
    has drawn it (Playwright checks the condition on animation frames)."""
    page.wait_for_function(_RUN_DONE, arg=n0, timeout=120_000)


def _settle(page: Any, action: Any) -> None:
    """``action``, then wait until the script run it causes has ended and drawn."""
    n0 = _runs(page)
    action()
    _idle(page, n0)


# The dashboard's pages and the heading each one shows once drawn (the Map page: its canvas, once it has drawn).
PAGE_HEADINGS = {
    "Overview": "Overview",
    "Disagreements": "Disagreements",
    "Review": "Review",
    "Duplicates": "Duplicates",
    "Impact": "Impact of the review",
    "Export": "Export the cleaned labels",
}
FIRST = "first of the session"  # rows so named load the page's scripts too; the bar's verdict leaves them out


def page_timings(db: Path, log: Path, rounds: int = 3) -> tuple[list[tuple[str, float]], list[str]]:
    """Every interaction of the Map page, and every page change from the sidebar, ``rounds`` times over in one
    browser session: (what, seconds) per timing, repeats under the same name. The first open of each page in the
    session (its scripts load then) is named apart, with :data:`FIRST` in its name. Also the number of images
    the lasso selected, each round."""
    from playwright.sync_api import sync_playwright

    from audit.dashboard.serve import serve

    sys.path.insert(0, str(ROOT / "tests"))
    from test_browser import open_options  # the browser tests' helpers
    from test_browser_map import hover, lasso, map_canvas

    rows: list[tuple[str, float]] = []
    with serve(db, log=log, env={"AUDIT_REVIEWER": "bench"}) as url, sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        page = b.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(180_000)
        page.add_init_script(RUN_WATCH)
        side = page.get_by_test_id("stSidebar")
        seen = {"Overview"}  # the page the session opens on
        sizes: list[str] = []  # the lasso's selection, each round

        def timed(what: str, action: Any, *, run: bool = True, shows: bool = False) -> None:
            """``action``, timed until the script run it causes has ended and drawn (``run=False``: an action
            the browser alone handles, such as drawing the lasso, timed until it returns; ``shows``: an action
            that waits for something only its run draws, such as a new page's heading, then for no run left)."""
            t = time.perf_counter()
            if run and shows:
                # No run count here: a short run can start and end between two of the page's frames, so the
                # count may miss it; the new page's own content has shown, so a run has begun, and what is left
                # is for it to end.
                action()
                _idle(page)
            elif run:
                _settle(page, action)
            else:
                action()
            took = time.perf_counter() - t
            rows.append((what, took))
            print(f"map page: {what:70s} {took:.3f} s", file=sys.stderr)

        def colour(label: str) -> Any:
            def go() -> None:
                open_options(page, page.get_by_role("combobox", name="Colour by"))
                page.get_by_role("option", name=label, exact=True).click()

            return go

        def shown(name: str) -> None:
            """Wait for page ``name``'s own content: the Map's drawn canvas, another page's heading."""
            if name == "Map":
                map_canvas(page)
            else:
                page.get_by_role("heading", name=PAGE_HEADINGS[name], exact=True).wait_for()

        def open_page(name: str, came_from: str, how: Any = None) -> None:
            """Open page ``name`` (from the sidebar, or by ``how``), timed, named by where it came from."""
            first = name not in seen
            seen.add(name)
            label = f"open the {name} page from the {came_from} page" + (f" ({FIRST})" if first else "")

            def go() -> None:
                (how or side.get_by_text(name, exact=True).click)()
                shown(name)

            timed(label, go, shows=True)

        from audit.dashboard.maphover import REST_MS
        from audit.mapview import COLOURS

        page.goto(f"{url}/?page=overview")
        _idle(page, 0)
        gallery = page.get_by_text("selected images")
        saved = page.get_by_text(re.compile(r"Decision \d+ saved: keep"))
        for rnd in range(rounds):
            print(f"round {rnd + 1} of {rounds}", file=sys.stderr)
            open_page("Map", "Overview")
            for key in ("current", "flagged", "check", "reviewed", "confidence", "given"):
                timed(f"colour by {COLOURS[key]}", colour(COLOURS[key]))
            timed("filter outline off", lambda: page.get_by_text("Outline the gallery's filter").click())
            timed("filter outline on", lambda: page.get_by_text("Outline the gallery's filter").click())
            # Resting the pointer on a point: from the pointer's move until its thumbnail card shows (the element's
            # rest delay, the fragment's rerun and the card's drawing), on points spread over the drawing.
            for k in (0, 3000, 7000, 11000):
                t = time.perf_counter()
                card = hover(page, k)
                took = time.perf_counter() - t
                rows.append((f"rest the pointer on a point: its thumbnail shows ({REST_MS} ms rest included)", took))
                print(f"map page: hover point {k}: {took:.3f} s", file=sys.stderr)
                page.mouse.move(5, 5)
                card.wait_for(state="hidden")
                _idle(page)  # nothing left running
            # A lasso is two steps for the reviewer: drawing it (the canvas draws the path as the pointer moves, no
            # server round trip) and releasing it (Streamlit reruns and shows the gallery). Both are timed.
            timed("draw a lasso (24 pointer moves, in the browser)", lambda: lasso(page, 0.2, release=False), run=False)
            timed("release the lasso: its gallery", lambda: (page.mouse.up(), gallery.wait_for()))
            sizes.append(page.get_by_test_id("stMetric").filter(has_text="selected images").inner_text().split()[-1])
            first = "Review" not in seen
            seen.add("Review")
            timed(
                "send the selection to the review queue: the Review page" + (f" ({FIRST})" if first else ""),
                lambda: (page.get_by_role("button", name="Send these to the review queue").click(), shown("Review")),
                shows=True,
            )
            # A decision on the queue's first image (written, then the next image), and back to the Map: a decision
            # changes the data version, so the Map page runs every query afresh.
            timed(
                "keep the original label (a decision: written, the next image)",
                lambda: (page.get_by_role("button", name=re.compile(r"^Keep original")).click(), saved.wait_for()),
            )
            timed(
                "open the Map page from the Review page, after a decision",
                lambda: (side.get_by_text("Map", exact=True).click(), shown("Map")),
                shows=True,
            )
            # Every other page change, from the sidebar, round the pages and back to the Overview.
            prev = "Map"
            for name in ("Review", "Map", "Review", "Duplicates", "Disagreements", "Impact", "Export", "Overview"):
                open_page(name, prev)
                prev = name
        b.close()
    return rows, sizes


def summary(rows: list[tuple[str, float]]) -> list[tuple[str, list[float]]]:
    """The timings of ``rows`` grouped by what was timed, in the order first timed; each page's first open of the
    session last."""
    out: dict[str, list[float]] = {}
    for what, took in rows:
        out.setdefault(what, []).append(took)
    return sorted(out.items(), key=lambda kv: FIRST in kv[0])


def apptest_timings(db: Path) -> list[tuple[str, float]]:
    """The same interactions server-side, as reports/DASHBOARD.md times every other page: Streamlit's AppTest
    runs the script (queries, the figure, its serialisation) without a browser drawing the result."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from audit.mapview import COLOURS

    os.environ["AUDIT_DB"] = str(db)
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    # The Overview first, so the process's imports (Streamlit, the app, DuckDB: ~0.8 s here, once per server) are
    # not in the Map page's figure; then the Map page with every query run afresh (the cache emptied).
    at.query_params["page"] = "overview"
    at.run()
    st.cache_data.clear()
    at.session_state["page"] = "Map"
    rows: list[tuple[str, float]] = []

    def timed(what: str, step: Any) -> None:
        t = time.perf_counter()
        step()
        took = time.perf_counter() - t
        if at.exception:
            raise RuntimeError(f"{what}: {[e.value for e in at.exception]}")
        rows.append((what, took))
        print(f"apptest map: {what:55s} {took:.3f} s", file=sys.stderr)

    timed("open the Map page (first: every query, imports done)", at.run)
    timed("rerun, nothing changed", at.run)
    for key in ("current", "flagged", "check", "reviewed", "confidence", "given"):
        timed(f"colour by {COLOURS[key]}", lambda k=key: at.selectbox(key="m_colour").set_value(k).run())
    timed("filter outline off", lambda: at.toggle(key="m_highlight").set_value(False).run())
    timed("filter outline on", lambda: at.toggle(key="m_highlight").set_value(True).run())
    return rows


def _previous(before: dict[str, Any]) -> str:
    """One line on the bench's previous browser timings (reports/perf_map.json before this run) and the CPU
    reference they were measured at: the same code's figures move with the machine (~2x between sessions), so
    the margin under the bar on a slower machine shows beside this run's."""
    rows = [(w, s) for w, s in before.get("browser", []) if FIRST not in w]
    if not rows or not before.get("cpu_reference_s"):
        return ""
    what, worst = max(rows, key=lambda r: r[1])
    over = sum(1 for _, s in rows if s > BAR_INTERACTION)
    when = f", {before['browser_at']}" if before.get("browser_at") else ""
    return (
        f"The bench's previous run (CPU reference {before['cpu_reference_s']:.2f} s{when}): slowest {worst:.2f} s, "
        f"{what}; {over} of {len(rows)} timings over the {BAR_INTERACTION:.0f} s bar."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/audit-bench50k-map"))
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--sizes", default="10000,25000,50000")
    ap.add_argument("--skip-compute", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="times over every browser interaction (default 3)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_compute_child(a.child)))
        return 0
    load0 = os.getloadavg()
    cpu = dbench.cpu_reference()
    # --skip-compute keeps the compute rows of the last full run (reports/perf_map.json), said so in the table's
    # caption, so re-timing the page does not cost the ~4 minutes of fresh map computations.
    before = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    prev = before if a.skip_compute else {}
    scaling = prev.get("scaling", []) if a.skip_compute else compute_scaling([int(s) for s in a.sizes.split(",") if s])
    if prev and "at" not in prev:
        prev["at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(OUT_JSON.stat().st_mtime))
    reused = f" (these rows: from the bench's previous full run, {prev['at']})" if prev else ""
    t = time.perf_counter()
    db, _ = dbench.generate(a.dir, a.n, features=True)
    print(f"workspace {db} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    from audit.featuremap import read_current, read_map

    cur = read_current(db) or {}
    stored = read_map(db, *cur["default"]) if cur.get("default") else None
    app_rows = apptest_timings(db)
    rows, sizes = page_timings(db, a.dir / "streamlit.log", a.rounds)
    grouped = summary(rows)
    load1 = os.getloadavg()
    worst_app = max(s for _, s in app_rows)
    worst_what, worst = max(((w, s) for w, s in rows if FIRST not in w), key=lambda r: r[1])
    over = sum(1 for w, s in rows if FIRST not in w and s > BAR_INTERACTION)
    timed_n = sum(1 for w, _ in rows if FIRST not in w)
    out = {
        "scaling": scaling,
        "apptest": app_rows,
        "browser": rows,
        "rounds": a.rounds,
        "selected": sizes,
        "run_map": stored.params if stored else None,
        "load": [load0, load1],
        "cpu_reference_s": cpu,
        "at": prev.get("at") if a.skip_compute and prev else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "browser_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    earlier = _previous(before)
    OUT_JSON.write_text(json.dumps(out, indent=1))
    md = [
        dbench.MAP_BEGIN,
        "## Map page at 50,000 points",
        "",
        "Generated by `python reports/map_bench.py` (reports/map_bench.py). Load average at start "
        f"{load0[0]:.2f}, at end {load1[0]:.2f} (2 cores). CPU reference (Python's `sum(i * i for i in "
        f"range(10**7))`, best of 3): {cpu:.2f} s; the machine's speed has varied ~2x between sessions, so "
        "compare reports by it.",
        "",
        "**Computing the map** (audit.featuremap: L2-normalised features, PCA to 50, exact 14-NN by faiss, "
        "seeded UMAP; one fresh process each, so numba's start-up counts), synthetic 1,280-d float16 features "
        f"of 1,000 classes; bar {BAR_COMPUTE:.0f} s at 50,000{reused}:",
        "",
        "| images | PCA s | kNN s | total s | process s (imports included) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['images']:,} | {r.get('pca_seconds', '')} | {r.get('knn_seconds', '')} | {r['wall_s']} | "
            f"{r['process_s']} |"
            for r in scaling
        ),
        "",
    ]
    if stored is not None:
        md += [
            f"In the page's workspace (3 x 256-d features), `audit run` computed its map in "
            f"{stored.params.get('seconds')} s.",
            "",
        ]
    md += [
        f"**Interactions, server side** (Streamlit's AppTest, as every other page above is timed: the queries, the "
        f"figure and its serialisation), {a.n:,} images, at most {_max_points():,} drawn; bar {BAR_INTERACTION:.0f} s:",
        "",
        "| interaction | seconds |",
        "|---|---|",
        *(f"| {w} | {s:.2f} |" for w, s in app_rows),
        "",
        f"Slowest: {worst_app:.2f} s "
        f"({'within' if worst_app <= BAR_INTERACTION else 'NOT within'} the {BAR_INTERACTION:.0f} s bar).",
        "",
        f"**Interactions** in headless Chromium without a GPU (`{' '.join(ARGS)}`: software compositing, no "
        f"WebGL), {a.n:,} images, at most {_max_points():,} drawn on the page's 2-D canvas "
        "(audit/dashboard/mapcanvas.py); from the action until the script run it caused has ended and the page has "
        "drawn it (the page counts ended runs; the Map page: until its canvas has drawn, another page: until its "
        'heading shows and no element of the last page is left; Streamlit\'s "Running..." icon, which a run '
        "over 0.5 s shows, is not waited for while it fades out after the run). The whole sequence ran "
        f"{a.rounds} times in one "
        "browser session (the Map page's interactions, then every page change from the sidebar); the lasso "
        f"selected {', '.join(sizes)} images in turn; bar "
        f"{BAR_INTERACTION:.0f} s:",
        "",
        "| interaction | times | median s | slowest s |",
        "|---|---:|---:|---:|",
        *(f"| {w} | {len(v)} | {float(np.median(v)):.2f} | {max(v):.2f} |" for w, v in grouped),
        "",
        f"Slowest of the {timed_n} timings, leaving out each page's first open of the session (its scripts load "
        f"then; listed above): {worst:.2f} s, {worst_what} "
        f"({'within' if worst <= BAR_INTERACTION else 'NOT within'} the {BAR_INTERACTION:.0f} s bar; "
        f"{over} over it). Browser, "
        "server and benchmark share this machine's 2 cores. Drawing the lasso is the canvas's own work (it draws "
        "the path as the pointer moves; no server round trip); releasing it is the Streamlit rerun that "
        "fills the gallery. Until 2026-12-02 the page drew a plotly WebGL scatter, which in a GPU-less Chromium "
        "ran through SwiftShader: colour changes took 1.2-4.2 s and drawing a lasso 6 s on this machine.",
        *(["", earlier] if earlier else []),
        dbench.MAP_END,
        "",
    ]
    old = dbench.OUT_MD.read_text() if dbench.OUT_MD.exists() else ""
    if dbench.MAP_BEGIN in old and dbench.MAP_END in old:
        i, j = old.index(dbench.MAP_BEGIN), old.index(dbench.MAP_END) + len(dbench.MAP_END)
        new = old[:i] + "\n".join(md).rstrip("\n") + old[j:]
    else:
        new = old.rstrip("\n") + "\n\n" + "\n".join(md)
    dbench.OUT_MD.write_text(new)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
