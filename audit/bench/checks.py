"""All checks together after scoring: 50,000 images, 3 models' 1280-d features, the issue's 60 s and 4 GiB bars.

Inputs are seeded and synthetic but shaped as a run hands them to the checks
(:func:`audit.pipeline._check_inputs`): per model an ``(N, 1000)`` float32
probability matrix and an ``(N, D)`` float16 feature matrix, memory-mapped from
``.npy`` files as the workspace's arrays are; the given labels with a planted 5%
of wrong ones; and the decode pass's pixel statistics (every column of
:data:`audit.scoring.pixels.COLUMNS`, a few planted dark images and exact copies).
Features cluster by class (1,000 centres and noise), so the neighbour graph has
the structure real features give it.

The parent writes the inputs once; a fresh child process loads them and runs the
registry's default checks through :func:`audit.checks.run_checks`, the run's own
path, and reports each check's seconds, the total and its peak resident memory
(VmHWM: the inputs it maps count when touched, as in a run). Writes
``reports/perf_checks.{md,json,csv}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import REPORTS, machine, machine_md, md_table, peak_rss_mib, run_child, write_csv, write_json

__all__ = ["checks"]

BAR_SECONDS = 60.0  # the bar: all checks on 50,000 images within 60 s after scoring
BAR_GIB = 4.0  # ... and 4 GiB
_NOISE = 0.05  # share of planted wrong labels


def _write_inputs(out: Path, n: int, models: int, d: int, classes: int, seed: int) -> None:
    """Seeded inputs in ``out``: probs/features per model (.npy), labels, truth and pixel columns."""
    from audit.scoring.pixels import COLUMNS

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    labels = truth.copy()
    wrong = rng.choice(n, int(_NOISE * n), replace=False)
    labels[wrong] = (truth[wrong] + rng.integers(1, classes, len(wrong))) % classes
    np.save(out / "labels.npy", labels)
    np.save(out / "truth.npy", truth)
    step = 5000
    for m in range(models):
        centres = rng.normal(0, 1, (classes, d)).astype(np.float32)
        f = np.lib.format.open_memmap(out / f"m{m}.features.npy", "w+", np.float16, (n, d))
        p = np.lib.format.open_memmap(out / f"m{m}.probs.npy", "w+", np.float32, (n, classes))
        for s in range(0, n, step):
            e = min(n, s + step)
            f[s:e] = np.maximum(centres[truth[s:e]] + rng.normal(0, 1.0, (e - s, d)).astype(np.float32), 0)
            logits = rng.normal(0, 1, (e - s, classes)).astype(np.float32)
            logits[np.arange(e - s), truth[s:e]] += rng.uniform(2, 9, e - s).astype(np.float32)
            logits -= logits.max(axis=1, keepdims=True)
            ex = np.exp(logits)
            p[s:e] = ex / ex.sum(axis=1, keepdims=True)
        f.flush()
        p.flush()
        del f, p
    w = rng.normal(400, 60, n).clip(64, 2000).astype(np.int32)
    h = (w * rng.choice([0.75, 1.0, 1.333], n)).astype(np.int32)
    bright = rng.uniform(0.25, 0.75, n)
    cols: dict[str, np.ndarray] = {
        "ok": np.ones(n, dtype=bool),
        "width": w,
        "height": h,
        "brightness": bright,
        "brightness_perc_5": (bright - 0.2).clip(0, 1),
        "brightness_perc_99": (bright + 0.2).clip(0, 1),
        "aspect_ratio": np.minimum(w / h, h / w),
        "size": np.sqrt(w.astype(np.float64) * h),
        "entropy": rng.uniform(5.5, 7.9, n),
        "blurriness": rng.uniform(20, 120, n),
        "blurriness_grayscale_std": rng.uniform(40, 80, n),
        "grayscale": rng.random(n) < 0.01,
        "md5": np.array([f"{i:032x}" for i in rng.permutation(n)], dtype="<U32"),
        "phash": rng.integers(0, 2**63, n, dtype=np.uint64),
        "dhash": rng.integers(0, 2**63, n, dtype=np.uint64),
    }
    dark = rng.choice(n, 50, replace=False)
    cols["brightness_perc_99"][dark] = 0.02
    copies = rng.choice(n, 100, replace=False)
    cols["md5"][copies[50:]] = cols["md5"][copies[:50]]  # 50 exact pairs
    if set(cols) != set(COLUMNS):  # the bench is out of step with the decode pass's columns
        raise RuntimeError(f"pixel columns differ: {sorted(set(COLUMNS) ^ set(cols))}")
    np.savez(out / "pixels.npz", **cols)
    (out / "meta.json").write_text(json.dumps({"n": n, "models": models, "d": d, "classes": classes}))


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current size (Linux ``clear_refs`` 5); no-op where refused."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(data: Path, names: str | None, json_out: Path) -> int:
    """Load the inputs (memory-mapped) and run the checks as a run does; write timings and peak memory."""
    from audit.checks import CheckInputs, make_checks, run_checks
    from audit.checks._neighbors import resolve_backend

    meta = json.loads((data / "meta.json").read_text())
    n, models = meta["n"], meta["models"]
    px = dict(np.load(data / "pixels.npz"))
    inputs = CheckInputs(
        n=n,
        labels=np.load(data / "labels.npy"),
        n_classes=meta["classes"],
        class_names=tuple(f"c{i}" for i in range(meta["classes"])),
        valid=np.ones(n, dtype=bool),
        probs=[np.load(data / f"m{m}.probs.npy", mmap_mode="r") for m in range(models)],
        logits=None,
        model_names=tuple(f"m{m}" for m in range(models)),
        features=[np.load(data / f"m{m}.features.npy", mmap_mode="r") for m in range(models)],
        pixels=px,
        image_ids=tuple(f"img{i:06d}.jpg" for i in range(n)),
        feature_models=tuple(f"m{m}" for m in range(models)),
    )
    before = peak_rss_mib()["peak_rss_mib"]
    # One check at a time, as run_checks runs them (the memo carries results and the neighbour
    # graph from one call to the next: same inputs object), with the peak reset before each, so
    # every check gets its own peak and the run's peak is the largest.
    results, skipped, peaks = [], {}, {}
    t = time.perf_counter()
    for check in make_checks(names):
        _reset_peak()
        res, notes = run_checks(inputs, [check])
        results += res
        skipped.update(notes)
        peaks[check.name] = peak_rss_mib()["peak_rss_mib"]
    total = time.perf_counter() - t
    truth = np.load(data / "truth.npy")
    wrong = inputs.labels != truth
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "check": r.check,
            "seconds": r.summary["seconds"],
            "issues": r.summary["n_issues"],
            "peak_gib": round(peaks[r.check] / 1024, 2),
        }
        if r.check in ("label", "knn_label", "label_knn"):
            from sklearn.metrics import average_precision_score

            ok = np.isfinite(r.score)
            row["ap_vs_planted"] = round(float(average_precision_score(wrong[ok], -r.score[ok])), 3)
        rows.append(row)
    out = {
        "n": n,
        "models": models,
        "d": meta["d"],
        "classes": meta["classes"],
        "knn_backend": resolve_backend("auto"),
        "total_s": round(total, 2),
        "rss_before_checks_mib": before,
        **peak_rss_mib(),
        "peak_rss_mib": max([before, *peaks.values()]),
        "checks": rows,
        "skipped": skipped,
    }
    json_out.write_text(json.dumps(out))
    return 0


def checks(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="images (default 50,000)")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--d", type=int, default=1280, help="feature width per model")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--checks", default=None, help="names or patterns (default: the registry's default checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS / "perf_checks")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        return _child(a.child, a.checks, a.json)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="audit-bench-checks-") as tmp:
        t = time.perf_counter()
        print(f"writing seeded inputs: {a.n:,} images x {a.models} models ({a.d}-d features, {a.classes} classes)")
        _write_inputs(Path(tmp), a.n, a.models, a.d, a.classes, a.seed)
        print(f"  {time.perf_counter() - t:.1f} s; running the checks in a fresh process")
        args = ["checks", "--child", tmp, *(["--checks", a.checks] if a.checks else [])]
        res = run_child(args)
    gib = res["peak_rss_mib"] / 1024
    ok = res["total_s"] <= BAR_SECONDS and gib <= BAR_GIB
    res["bar"] = {"seconds": BAR_SECONDS, "gib": BAR_GIB, "met": ok}
    res["machine"] = info
    write_json(a.out.with_suffix(".json"), res)
    write_csv(a.out.with_suffix(".csv"), res["checks"])
    lines = [
        "# All checks after scoring: time and memory",
        "",
        f"Generated by `python -m audit.bench checks --n {a.n} --models {a.models} --d {a.d}` "
        f"(audit/bench/checks.py). Seeded synthetic inputs shaped as a run hands them to the checks: "
        f"{a.n:,} images, {a.models} models' {a.d}-d float16 features and {a.classes}-class probabilities "
        f"(memory-mapped), {_NOISE:.0%} planted wrong labels, the decode pass's pixel statistics. "
        f"Neighbour search backend: {res['knn_backend']}.",
        "",
        md_table(res["checks"]),
        "",
        f"**All checks together: {res['total_s']:.1f} s** (bar {BAR_SECONDS:.0f} s); peak resident memory of the "
        f"process {gib:.2f} GiB (bar {BAR_GIB:.0f} GiB; {res['rss_before_checks_mib'] / 1024:.2f} GiB before the "
        f"checks started). Bars {'met' if ok else 'NOT met'}."
        + (f" Skipped: {res['skipped']}." if res["skipped"] else ""),
        "",
        "`peak_gib`: the process's peak resident memory while that check ran (VmHWM reset before each; "
        "it includes what earlier checks left for later ones: the memo's neighbour graph, mapped inputs "
        "already touched). The run's peak is the largest of them.",
        "",
        "`ap_vs_planted`: average precision of the check's score for the planted wrong labels (synthetic; "
        "not a quality claim, a sanity line that the checks ranked what was planted).",
        "",
        machine_md(info),
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
