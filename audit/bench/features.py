"""What recording features costs: the same images and models scored with features off and on, side by side.

Each arm is ``audit run``'s scoring path (:func:`audit.bench.scoring.audit_arm`)
in a fresh process, into a fresh workspace; the arms alternate (off, on, on,
off, ...) so that load from other processes hits both alike. The report gives
each pair's wall time and scoring time, the median slowdown of features on
over features off, and the per-model forward time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import (
    LITE,
    REPORTS,
    add_run_args,
    machine,
    machine_md,
    md_table,
    run_child,
    write_csv,
    write_json,
)

__all__ = ["features"]

BUDGET = 0.10  # the bound: features may cost at most 10% of scoring time


def _pct(on: float, off: float) -> float:
    return round(100.0 * (on / off - 1.0), 1)


def features(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench features", description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.set_defaults(models=",".join([*LITE, "squeezenet1_1"]))
    p.add_argument("--limit", type=int, help="score only this many images, evenly spaced over the sorted ids")
    p.add_argument("--repeats", type=int, default=2, help="off/on pairs, interleaved (the order flips every pair)")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_features")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. that the machine was shared)")
    p.add_argument("--render", type=Path, help="re-render the report from a .raw.json of an earlier run")
    a = p.parse_args(argv)
    if not a.dataset.is_dir() and not a.render:
        print(f"skipped: {a.dataset} not found (the shared 1,300-image set lives in ../shared)")
        return 0
    info = machine()
    common = ["--dataset", str(a.dataset), "--models", a.models, "--batch-size", str(a.batch_size)]
    common += ["--workers", str(a.workers), "--backend", a.backend]
    if a.limit:
        common += ["--limit", str(a.limit)]
    runs: list[dict[str, Any]] = json.loads(a.render.read_text()) if a.render else []
    for r in range(0 if a.render else a.repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            print(f"repeat {r + 1}/{a.repeats}: features {'on' if on else 'off'} ...", flush=True)
            res = run_child(["arm", "audit", *common, *([] if on else ["--no-features"])])
            res["repeat"] = r + 1
            runs.append(res)
            write_json(a.out.with_suffix(".raw.json"), runs)  # kept until the report is written
            print(f"  {res['wall_s']:.1f} s", flush=True)
    rows = []
    for r in range(1, a.repeats + 1):
        off = next(x for x in runs if x["repeat"] == r and not x["features"])
        on = next(x for x in runs if x["repeat"] == r and x["features"])
        rows.append(
            {
                "repeat": r,
                "off_wall_s": round(off["wall_s"], 2),
                "on_wall_s": round(on["wall_s"], 2),
                "wall_slowdown_%": _pct(on["wall_s"], off["wall_s"]),
                "off_scoring_s": round(off["stats"]["total"], 2),
                "on_scoring_s": round(on["stats"]["total"], 2),
                "scoring_slowdown_%": _pct(on["stats"]["total"], off["stats"]["total"]),
                "off_forward_s": round(sum(off["stats"]["forward"].values()), 2),
                "on_forward_s": round(sum(on["stats"]["forward"].values()), 2),
                "forward_slowdown_%": _pct(sum(on["stats"]["forward"].values()), sum(off["stats"]["forward"].values())),
                "backend": on["stats"]["backend"],
                "load avg 1-min at end (off/on)": "/".join(str(x["loadavg_1_5_15_at_end"][0]) for x in (off, on)),
            }
        )
    models = [m for m in a.models.split(",") if m]
    per_model = []
    for j, m in enumerate(models):
        # Keyed by the models' canonical names ("efficientnet_lite0.in1k"), in the order given.
        f_off = [list(x["stats"]["forward"].values())[j] for x in runs if not x["features"]]
        f_on = [list(x["stats"]["forward"].values())[j] for x in runs if x["features"]]
        per_model.append(
            {
                "model": m,
                "forward_s off (median)": round(float(np.median(f_off)), 2),
                "forward_s on (median)": round(float(np.median(f_on)), 2),
                "slowdown_%": _pct(float(np.median(f_on)), float(np.median(f_off))),
            }
        )
    n = runs[0]["images"]
    scoring = float(np.median([r["scoring_slowdown_%"] for r in rows]))
    summary = {
        "images": n,
        "models": models,
        "median_scoring_slowdown_%": scoring,
        "median_wall_slowdown_%": float(np.median([r["wall_slowdown_%"] for r in rows])),
        "within_budget": scoring <= 100 * BUDGET,
        "machine": info,
    }
    for r in runs:
        r.pop("models", None)  # argmaxes: not what this report is about
    write_json(a.out.with_suffix(".json"), {"summary": summary, "rows": rows, "per_model": per_model, "runs": runs})
    write_csv(a.out.with_suffix(".csv"), rows)
    cmd = f"python -m audit.bench features --models {a.models}" + (f" --limit {a.limit}" if a.limit else "")
    md = [
        "# Features: scoring with features on vs off",
        "",
        f"Generated by `{cmd} --repeats {a.repeats}` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"{n} images of `{a.dataset.name}`, models {', '.join(models)}, batch {a.batch_size}, {a.workers} loader "
        f"workers, backend `{rows[0]['backend']}`, fp32; the arms alternate in fresh processes, each into a fresh "
        "workspace. Scoring time is `score_dataset`'s (load, export and compile, forward, shards, assembly); wall "
        "time adds building the models. Features on: each model's penultimate features from the same forward pass, "
        "written as float16 beside the logits.",
        *(["", a.note] if a.note else []),
        "",
        md_table(rows),
        "",
        md_table(per_model),
        "",
        f"**Median scoring slowdown with features on: {scoring:+.1f}% (budget: at most {100 * BUDGET:.0f}%).**",
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    a.out.with_suffix(".raw.json").unlink(missing_ok=True)
    print("\n".join(md))
    return 0
