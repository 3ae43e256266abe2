"""Scale: synthetic ImageNet-sized data, 50,000 images end to end, and post-processing of 50,000 x 1,000 x 3.

* ``gen-images``: a 1,000-class ImageFolder of JPEGs with ImageNet's typical
  sizes (mostly 500 x 375 / 375 x 500 / 500 x 333, some squares and odd
  sizes), named like the ILSVRC-2012 validation files so ReaL applies.
* ``gen-preds``: M synthetic logit files ``(N, C)`` (``.npy`` + ``.ids.txt``),
  written in chunks; most rows favour the given label, some another class (a
  label error), some two classes (multi-label), so every evaluation and
  cleanlab have real work to do.
* ``post``: ``audit run`` on M prediction files (import, every evaluation,
  cleanlab flagging, DuckDB ingest), each N in a fresh process: wall time per
  stage and peak memory, to show how memory grows with N.
* ``scale``: ``audit run`` on the synthetic images with one model, end to end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import (
    REPORTS,
    TreeMemory,
    machine,
    machine_md,
    md_table,
    peak_rss_mib,
    run_child,
    write_csv,
    write_json,
)

DEFAULT_IMAGES = Path(tempfile.gettempdir()) / "audit-synth-50k"
DEFAULT_PREDS = Path(tempfile.gettempdir()) / "audit-synth-preds"


def _wnids() -> tuple[str, ...]:
    from audit.datasets import imagenet_label_space

    return imagenet_label_space().keys


def synthetic_ids(n: int, n_classes: int = 1000) -> tuple[list[str], np.ndarray]:
    """Image ids ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` (sorted) and their labels (class ``i % n_classes``)."""
    wnids = _wnids()
    labels = np.arange(n) % n_classes
    ids = [f"{wnids[c]}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, c in enumerate(labels)]
    order = np.argsort(ids, kind="stable")
    return [ids[i] for i in order], labels[order]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    u = rng.random()
    if u < 0.45:
        return 500, int(rng.choice([375, 333, 334, 281]))
    if u < 0.7:
        return int(rng.choice([375, 333, 334])), 500
    if u < 0.8:
        return 500, 500
    return int(rng.integers(120, 1200)), int(rng.integers(120, 1000))


def _write_images(job: tuple[Path, list[str], int]) -> int:
    from PIL import Image

    root, ids, seed = job
    rng = np.random.default_rng(seed)
    made = 0
    for rel in ids:
        path = root / rel
        if path.exists():
            continue
        w, h = _size(rng)
        small = rng.integers(0, 256, (int(rng.integers(4, 24)), int(rng.integers(4, 24)), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape, dtype=np.int16), 0, 255).astype(np.uint8)  # texture
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name)
        Image.fromarray(img).save(tmp, "JPEG", quality=90)
        tmp.replace(path)
        made += 1
    return made


def gen_images(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench gen-images", description="synthetic ImageNet-sized JPEGs")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--out", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    ids, _ = synthetic_ids(a.n)
    root = a.out / "val"
    step = 500
    jobs = [(root, ids[s : s + step], s) for s in range(0, len(ids), step)]
    t = time.perf_counter()
    with mp.get_context("fork").Pool(a.jobs) as pool:
        made = sum(pool.imap_unordered(_write_images, jobs))
    size = sum(f.stat().st_size for f in root.rglob("*.JPEG"))
    print(f"{a.out}: {len(ids)} images ({made} new) in {time.perf_counter() - t:.0f} s, {size / 2**30:.2f} GiB")
    return 0


def _rows_logits(rng: np.random.Generator, labels: np.ndarray, truth: np.ndarray, second: np.ndarray, c: int):
    n = len(labels)
    x = rng.normal(0.0, 1.5, (n, c)).astype(np.float32)
    r = np.arange(n)
    x[r, truth] += rng.uniform(5, 11, n).astype(np.float32)
    has2 = second >= 0
    x[r[has2], second[has2]] += rng.uniform(4, 10, int(has2.sum())).astype(np.float32)
    return x


def gen_preds(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m audit.bench gen-preds", description="synthetic (N, C) logit files")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_PREDS)
    a = p.parse_args(argv)
    write_preds(a.out, a.n, a.classes, a.models)
    print(f"{a.out}: {a.models} x ({a.n}, {a.classes}) float32 logits")
    return 0


def write_preds(out: Path, n: int, c: int, m: int, seed: int = 0) -> list[Path]:
    """Write ``m{k}.npy`` + ``m{k}.ids.txt`` for k < m; returns the .npy paths."""
    from numpy.lib.format import open_memmap

    out.mkdir(parents=True, exist_ok=True)
    ids, labels = synthetic_ids(n, c)
    rng = np.random.default_rng(seed)
    # Shared ground truth: 5% label errors, 10% images with a second class.
    wrong = rng.random(n) < 0.05
    truth = np.where(wrong, (labels + rng.integers(1, c, n)) % c, labels)
    second = np.where(rng.random(n) < 0.10, (truth + rng.integers(1, c, n)) % c, -1)
    paths = []
    for k in range(m):
        path = out / f"m{k}.npy"
        mm = open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, c))
        rk = np.random.default_rng(seed + 1 + k)
        for s in range(0, n, 4096):
            e = min(n, s + 4096)
            mm[s:e] = _rows_logits(rk, labels[s:e], truth[s:e], second[s:e], c)
        mm.flush()
        del mm
        path.with_suffix(".tmp.npy").replace(path)
        path.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- post-processing


def _timed(stages: dict[str, float], name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - t

    return wrapper


def post_arm(n: int, models: int, preds: Path, classes: int = 1000) -> dict[str, Any]:
    """``run_audit`` on ``models`` prediction files of N rows; wall time per stage and peak memory."""
    from audit import flag, pipeline, score
    from audit.datasets import AuditDataset, imagenet_label_space, real_index_of
    from audit.datasets import load_real_labels as _real
    from audit.zoo import resolve_model

    t = time.perf_counter()
    # Imports are paid once per process; timed apart from the work.
    import cleanlab.count
    import cleanlab.rank  # noqa: F401
    import duckdb  # noqa: F401
    import torch  # noqa: F401

    t_imports = time.perf_counter() - t
    files = sorted(preds.glob("m*.npy"))[:models]
    ids, labels = synthetic_ids(n, classes)
    real, src = _real()
    ds = AuditDataset(
        root=preds,
        image_ids=tuple(ids),
        labels=labels.astype(np.int64),
        label_space=imagenet_label_space(),
        layout="imagefolder-wnid",
        real=[list(real[real_index_of(i)]) for i in ids],  # type: ignore[index]
        real_source=src,
    )
    stages: dict[str, float] = {}
    pipeline.score_dataset = _timed(stages, "import predictions", pipeline.score_dataset)
    pipeline.topk_of = _timed(stages, "top-k", pipeline.topk_of)
    pipeline._prediction_frame = _timed(stages, "prediction frames", pipeline._prediction_frame)
    pipeline._evaluate = _timed(stages, "evaluations", pipeline._evaluate)
    pipeline._ensemble_mean = _timed(stages, "ensemble mean", pipeline._ensemble_mean)
    flag.find_label_issues = _timed(stages, "cleanlab flagging", flag.find_label_issues)
    pipeline._ingest = _timed(stages, "DuckDB ingest", pipeline._ingest)
    pipeline._register_run = _timed(stages, "register run", pipeline._register_run)
    del score
    with tempfile.TemporaryDirectory() as tmp, TreeMemory(interval=0.1) as mem:
        specs = [resolve_model(f"preds:{f}") for f in files]
        t = time.perf_counter()
        res = pipeline.run_audit(ds, specs, Path(tmp) / "w.duckdb", progress=False)
        wall = time.perf_counter() - t
        db_mib = (Path(tmp) / "w.duckdb").stat().st_size / 2**20
    out = {
        "n": n,
        "classes": classes,
        "models": len(files),
        "wall_s": wall,
        "imports_s": t_imports,
        "stages": stages,
        "flagged": res.n_flagged,
        "db_mib": round(db_mib, 1),
        "peak_tree_pss_mib": mem.peak_mib,
        "matrices_mib": round(2 * len(files) * n * classes * 4 / 2**20, 1),
    }
    out.update(peak_rss_mib())
    return out


def post(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench post", description="post-processing at scale")
    p.add_argument("--sizes", default="10000,25000,50000")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--preds", type=Path, default=DEFAULT_PREDS)
    p.add_argument("--out", type=Path, default=REPORTS / "scale_post")
    p.add_argument("--arm", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        write_json(a.json, post_arm(a.arm, a.models, a.preds))
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    n_max = max(sizes)
    have = sorted(a.preds.glob("m*.npy"))
    if len(have) < a.models or np.load(have[0], mmap_mode="r").shape[0] != n_max:
        print(f"writing {a.models} synthetic prediction files of {n_max} x 1000 to {a.preds} ...", flush=True)
        write_preds(a.preds, n_max, 1000, a.models)
    info = machine()
    rows = []
    for n in sizes:
        sub = a.preds if n == n_max else a.preds / f"n{n}"
        if n != n_max and len(sorted(sub.glob("m*.npy"))) < a.models:
            write_preds(sub, n, 1000, a.models)
        print(f"post-processing {n} x 1000 x {a.models} ...", flush=True)
        r = run_child(["post", "--arm", str(n), "--models", str(a.models), "--preds", str(sub)])
        row = {
            "images": n,
            "models": r["models"],
            "wall_s": round(r["wall_s"], 1),
            "imports_s (not in wall)": round(r["imports_s"], 1),
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_pss_mib": r["peak_tree_pss_mib"],
            "matrices_mib (logits+probs)": r["matrices_mib"],
            "rss_minus_matrices_mib": round(r["peak_rss_mib"] - r["matrices_mib"], 1),
            "flagged": r["flagged"],
            "db_mib": r["db_mib"],
        }
        row.update({f"{k} s": round(v, 2) for k, v in r["stages"].items()})
        rows.append(row)
        print(f"  {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
    write_csv(a.out.with_suffix(".csv"), rows)
    big = rows[-1]
    ok = big["wall_s"] <= 60 and big["peak_rss_mib"] <= 4096
    md = [
        "# Post-processing at scale: 50,000 images x 1,000 classes x 3 models",
        "",
        f"Generated by `python -m audit.bench post` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        "`run_audit` on synthetic prediction files (`python -m audit.bench gen-preds`): importing the logits "
        "into the workspace (logits + probabilities, memory-mapped), top-k, every evaluation (original, ReaL, "
        "sigmoid with cross-fitted threshold, clean, relabeled) per model and for the ensemble, cleanlab "
        "flagging of the calibrated ensemble, and the DuckDB ingest. Each size runs in a fresh process; "
        "stage columns are wall seconds; peak RSS is the process's high-water mark (getrusage), peak PSS the "
        "sampled proportional set size.",
        "",
        md_table(rows),
        "",
        f"**{big['images']:,} x 1,000 x {big['models']}: {big['wall_s']} s, peak RSS {big['peak_rss_mib']:,.0f} MiB "
        f"(bars: 60 s, 4,096 MiB: {'met' if ok else 'NOT met'}).**",
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


# --------------------------------------------------------------------------- end to end


def scale_arm(dataset: Path, model: str, batch_size: int, workers: int, limit: int | None) -> dict[str, Any]:
    from audit.datasets import load_dataset
    from audit.pipeline import run_audit
    from audit.scoring import ScoreStats
    from audit.zoo import resolve_model

    stats = ScoreStats()
    import audit.pipeline as pipeline

    real_score = pipeline.score_dataset

    def score_with_stats(*args: Any, **kw: Any) -> Any:
        return real_score(*args, stats=stats, **kw)

    pipeline.score_dataset = score_with_stats
    with tempfile.TemporaryDirectory() as tmp, TreeMemory(interval=0.5) as mem:
        t = time.perf_counter()
        ds = load_dataset(dataset, limit=limit)
        t_load = time.perf_counter() - t
        res = run_audit(ds, [resolve_model(model)], Path(tmp) / "w.duckdb", batch_size=batch_size, workers=workers)
        wall = time.perf_counter() - t
    out = {
        "images": len(ds),
        "model": model,
        "wall_s": wall,
        "load_dataset_s": t_load,
        "score": stats.as_dict(),
        "post_s": wall - t_load - stats.total,
        "bad": res.n_bad,
        "peak_tree_pss_mib": mem.peak_mib,
    }
    out.update(peak_rss_mib())
    return out


def scale(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench scale", description="audit run on 50,000 images")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path, default=REPORTS / "scale_e2e")
    p.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        write_json(a.json, scale_arm(a.images, a.model, a.batch_size, a.workers, a.limit))
        return 0
    if not (a.images / "val").is_dir():
        print(f"no images at {a.images}; run 'python -m audit.bench gen-images --out {a.images}' first")
        return 2
    info = machine()
    args = ["scale", "--arm", "--images", str(a.images), "--model", a.model, "--batch-size", str(a.batch_size)]
    args += ["--workers", str(a.workers)] + (["--limit", str(a.limit)] if a.limit else [])
    r = run_child(args)
    s = r["score"]
    row = {
        "images": r["images"],
        "model": r["model"],
        "backend": s["backend"],
        "wall_s": round(r["wall_s"], 1),
        "images_per_s": round(r["images"] / r["wall_s"], 1),
        "load_dataset_s": round(r["load_dataset_s"], 1),
        "scoring_s": round(s["total"], 1),
        "forward_s": round(sum(s["forward"].values()), 1),
        "loader_wait_s": round(s["wait"], 1),
        "write+assemble_s": round(s["write"] + s["assemble"], 1),
        "post_s": round(r["post_s"], 1),
        "peak_rss_mib": r["peak_rss_mib"],
        "peak_child_rss_mib": r["peak_child_rss_mib"],
        "peak_tree_pss_mib": r["peak_tree_pss_mib"],
    }
    write_csv(a.out.with_suffix(".csv"), [row])
    md = [
        f"# `audit run` end to end on {r['images']:,} synthetic ImageNet-sized images, one model",
        "",
        f"Generated by `python -m audit.bench scale` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        "Images from `python -m audit.bench gen-images` (1,000 classes, JPEG q90, ImageNet's typical sizes). "
        f"Batch {a.batch_size}, {a.workers} loader workers. Peak RSS is the main process's high-water mark; "
        "loader workers are separate processes (their largest is shown); peak PSS is the whole process tree.",
        "",
        md_table([row]),
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0
