"""What measuring pixel statistics costs: the same images and models scored with pixel statistics off and on.

Pixel statistics (CleanVision's image properties and the duplicate hashes,
:mod:`audit.scoring.pixels`) are measured inside the one decode pass, in the
loader processes. Each arm is ``audit run``'s scoring path
(:func:`audit.bench.scoring.audit_arm`) in a fresh process, into a fresh
workspace; the arms alternate (off, on, on, off, ...) so that load from other
processes hits both alike. The report gives each pair's wall and scoring time,
the median slowdown (the issue's bar: at most 10%), and, measured in this
process on the same images, what each part of the statistics costs per image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import (
    REPORTS,
    add_run_args,
    machine,
    machine_md,
    md_table,
    run_child,
    write_csv,
    write_json,
)

__all__ = ["pixels"]

BUDGET = 0.10  # the issue's bound: pixel checks inside the decode pass add at most 10% to scoring


def _pct(on: float, off: float) -> float:
    return round(100.0 * (on / off - 1.0), 1)


def _parts(dataset: Path, limit: int | None) -> list[dict[str, Any]]:
    """Milliseconds per image of decoding and of each part of the statistics, in this process, one at a time."""
    import hashlib

    from cleanvision.issue_managers.duplicate_issue_manager import get_hash
    from cleanvision.issue_managers.image_property import (
        BlurrinessProperty,
        BrightnessProperty,
        EntropyProperty,
        calc_avg_brightness,
    )

    from audit.datasets import decode_image, load_dataset
    from audit.scoring.pixels import _brightness_percentiles, image_stats

    ds = load_dataset(dataset, limit=limit)
    paths = [ds.path(i) for i in range(len(ds))]
    t = time.perf_counter()
    imgs = [decode_image(p) for p in paths]
    parts = {"decode (for comparison: paid once, for models and pixels alike)": time.perf_counter() - t}
    image_stats(imgs[0])  # imports
    steps = {
        "all pixel statistics (image_stats)": image_stats,
        "brightness percentiles, by partition (used)": lambda im: _brightness_percentiles(np.asarray(im)),
        "brightness percentiles, CleanVision's calculate (not used)": BrightnessProperty("dark").calculate,
        "mean brightness (CleanVision)": calc_avg_brightness,
        "entropy (CleanVision)": EntropyProperty().calculate,
        "blurriness (CleanVision)": BlurrinessProperty().calculate,
        "md5 of the pixels": lambda im: hashlib.md5(np.asarray(im).tobytes()).hexdigest(),
        "phash + dhash (CleanVision's get_hash, on the grey image)": lambda im: [
            get_hash(im.convert("L"), {"hash_type": h, "hash_size": 8}) for h in ("phash", "dhash")
        ],
    }
    for name, fn in steps.items():
        t = time.perf_counter()
        for im in imgs:
            fn(im)
        parts[name] = time.perf_counter() - t
    return [{"part": k, "ms per image": round(1000 * v / len(imgs), 2)} for k, v in parts.items()]


def pixels(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench pixels", description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--limit", type=int, help="score only this many images, evenly spaced over the sorted ids")
    p.add_argument("--repeats", type=int, default=2, help="off/on pairs, interleaved (the order flips every pair)")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_pixels")
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
    raw = json.loads(a.render.read_text()) if a.render else {"runs": [], "parts": []}
    runs: list[dict[str, Any]] = raw["runs"]
    for r in range(0 if a.render else a.repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            print(f"repeat {r + 1}/{a.repeats}: pixel statistics {'on' if on else 'off'} ...", flush=True)
            res = run_child(["arm", "audit", *common, *([] if on else ["--no-pixels"])])
            res["repeat"] = r + 1
            runs.append(res)
            write_json(a.out.with_suffix(".raw.json"), raw)  # kept until the report is written
            print(f"  {res['wall_s']:.1f} s", flush=True)
    if not a.render:
        raw["parts"] = _parts(a.dataset, a.limit)
    rows = []
    for r in range(1, a.repeats + 1):
        off = next(x for x in runs if x["repeat"] == r and not x["pixels"])
        on = next(x for x in runs if x["repeat"] == r and x["pixels"])
        so, sn = off["stats"], on["stats"]
        rows.append(
            {
                "repeat": r,
                "off_wall_s": round(off["wall_s"], 2),
                "on_wall_s": round(on["wall_s"], 2),
                "wall_slowdown_%": _pct(on["wall_s"], off["wall_s"]),
                "off_scoring_s": round(so["total"], 2),
                "on_scoring_s": round(sn["total"], 2),
                "scoring_slowdown_%": _pct(sn["total"], so["total"]),
                "off_forward_s": round(sum(so["forward"].values()), 2),
                "on_forward_s": round(sum(sn["forward"].values()), 2),
                "loader wait off/on s": f"{so['wait']:.2f}/{sn['wait']:.2f}",
                "pixel CPU ms/image (loader)": round(1000 * sn["pixels"] / max(1, sn["pixel_images"]), 2),
                "backend": sn["backend"],
                "load avg 1-min at end (off/on)": "/".join(str(x["loadavg_1_5_15_at_end"][0]) for x in (off, on)),
            }
        )
    n = runs[0]["images"]
    models = [m for m in a.models.split(",") if m]
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
    out = {"summary": summary, "rows": rows, "parts": raw["parts"], "runs": runs}
    write_json(a.out.with_suffix(".json"), out)
    write_csv(a.out.with_suffix(".csv"), rows)
    cmd = f"python -m audit.bench pixels --models {a.models}" + (f" --limit {a.limit}" if a.limit else "")
    md = [
        "# Pixel statistics: scoring with pixel statistics off vs on",
        "",
        f"Generated by `{cmd} --repeats {a.repeats}` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"{n} images of `{a.dataset.name}`, models {', '.join(models)}, batch {a.batch_size}, {a.workers} loader "
        f"workers, backend `{rows[0]['backend']}`, fp32, features on in both arms; the arms alternate in fresh "
        "processes, each into a fresh workspace. Scoring time is `score_dataset`'s (load, export and compile, "
        "forward, shards, assembly). Pixel statistics on: each decoded image is also measured in the loader "
        "(CleanVision's image properties, md5 / phash / dhash) and the statistics written as shards beside the "
        "logits.",
        *(["", a.note] if a.note else []),
        "",
        md_table(rows),
        "",
        "Where the statistics' time goes, measured in one process on the same images (not inside the arms):",
        "",
        md_table(raw["parts"]),
        "",
        f"**Median scoring slowdown with pixel statistics on: {scoring:+.1f}% (budget: at most {100 * BUDGET:.0f}%).**",
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    a.out.with_suffix(".raw.json").unlink(missing_ok=True)
    print("\n".join(md))
    return 0
