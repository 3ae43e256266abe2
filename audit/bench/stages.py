"""Where the time of a scoring run goes, and how far it is from the forward-only ceiling.

1. Stage costs, each measured on its own over the whole dataset in this
   process: read (file bytes), decode (:func:`audit.datasets.decode_image`
   minus the read), resize + crop per model, batching, forward per model
   (normalisation included), softmax, top-k, writing shards and assembling.
2. The forward-only ceiling: the same runners on random uint8 batches of the
   same size and count, with no loading at all.
3. The real run (:func:`audit.scoring.score_dataset`, loader workers and all).

Ceiling and real run alternate ``--repeats`` times; the best of each is
compared, so load from other processes does not pass for a gap.
"""

from __future__ import annotations

import argparse
import tempfile
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
    write_csv,
    write_json,
)


def _loading_stages(ds: Any, specs: list[Any], batch_size: int) -> dict[str, float]:
    from audit.datasets import decode_image
    from audit.scoring import resize_crop

    t = dict.fromkeys(["read", "decode", "batch"], 0.0)
    for s in specs:
        t[f"resize {s.name}"] = 0.0
    crops: list[list[np.ndarray]] = [[] for _ in specs]
    for i in range(len(ds)):
        p = ds.path(i)
        t0 = time.perf_counter()
        p.read_bytes()
        t1 = time.perf_counter()
        img = decode_image(p)
        t2 = time.perf_counter()
        t["read"] += t1 - t0
        t["decode"] += max(0.0, (t2 - t1) - (t1 - t0))
        for m, s in enumerate(specs):
            t3 = time.perf_counter()
            crops[m].append(resize_crop(img, s.preprocess))
            t[f"resize {s.name}"] += time.perf_counter() - t3
        if len(crops[0]) == batch_size or i == len(ds) - 1:
            t4 = time.perf_counter()
            for c in crops:
                np.stack(c)
            t["batch"] += time.perf_counter() - t4
            crops = [[] for _ in specs]
    return t


def _ceiling(runners: list[Any], specs: list[Any], n: int, batch_size: int) -> dict[str, float]:
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for r, s in zip(runners, specs, strict=True):
        c = s.preprocess.crop
        x = torch.from_numpy(rng.integers(0, 256, (batch_size, c, c, 3), dtype=np.uint8))
        last = torch.from_numpy(rng.integers(0, 256, (n % batch_size or batch_size, c, c, 3), dtype=np.uint8))
        r(x[:1])  # warm
        t = time.perf_counter()
        for _ in range(n // batch_size):
            r(x)
        if n % batch_size:
            r(last)
        out[s.name] = time.perf_counter() - t
    return out


def stages(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench stages", description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path, default=REPORTS / "perf_stages")
    a = p.parse_args(argv)
    if not a.dataset.is_dir():
        print(f"skipped: {a.dataset} not found (the shared 1,300-image set lives in ../shared)")
        return 0
    from audit.datasets import load_dataset
    from audit.pipeline import topk_of
    from audit.scoring import ScoreStats, load_models, make_runner, resolve_backend, score_dataset, softmax
    from audit.zoo import resolve_model

    info = machine()
    ds = load_dataset(a.dataset, limit=a.limit)
    n = len(ds)
    specs = [resolve_model(m) for m in a.models.split(",") if m]
    built = load_models(specs)
    backend = resolve_backend(a.backend, "cpu")
    t = time.perf_counter()
    runners = [make_runner(built[s.name], s, backend=backend) for s in specs]
    prepare = time.perf_counter() - t
    print(f"{n} images, {len(specs)} models, backend {backend}; loading stages ...", flush=True)
    load = _loading_stages(ds, specs, a.batch_size)
    ceilings, runs = [], []
    for r in range(a.repeats):
        print(f"repeat {r + 1}: ceiling ...", flush=True)
        ceilings.append(_ceiling(runners, specs, n, a.batch_size))
        print(f"repeat {r + 1}: end to end ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            st = ScoreStats()
            arrays = score_dataset(
                ds,
                specs,
                Path(tmp) / "arrays",
                batch_size=a.batch_size,
                workers=a.workers,
                progress=False,
                models=built,
                backend=backend,
                stats=st,
            )
            logits = [np.load(x.logits) for x in arrays]
        runs.append(st)
    t = time.perf_counter()
    probs = [softmax(x.copy()) for x in logits]
    t_softmax = time.perf_counter() - t
    t = time.perf_counter()
    for q in probs:
        topk_of(q)
    t_topk = time.perf_counter() - t

    best_ceiling = min(ceilings, key=lambda c: sum(c.values()))
    best = min(runs, key=lambda s: s.total - s.prepare)
    ceiling_s = sum(best_ceiling.values())
    loop_s = best.total - best.prepare - best.build
    rows: list[dict[str, Any]] = []

    def row(stage: str, sec: float, where: str) -> None:
        rows.append({"stage": stage, "seconds": round(sec, 2), "ms/image": round(1000 * sec / n, 2), "where": where})

    row("model preparation (ONNX export + compile, all models)", prepare, "main, once per run")
    row("read (file bytes)", load["read"], "loader workers")
    row("decode (PIL, EXIF, RGB)", load["decode"], "loader workers")
    for s in specs:
        row(f"resize + crop {s.name}", load[f"resize {s.name}"], "loader workers")
    row("batching (stack uint8)", load["batch"], "loader workers")
    for s in specs:
        row(f"forward {s.name} (normalisation included)", best_ceiling[s.name], "main")
    row("softmax (all models)", t_softmax, "main, assemble")
    row("top-k (all models)", t_topk, "main, post-processing")
    row("write shards", best.write, "main")
    row("assemble (N, C) matrices", best.assemble, "main")
    loading = load["read"] + load["decode"] + load["batch"] + sum(load[f"resize {s.name}"] for s in specs)
    dist_loop = loop_s / ceiling_s - 1
    dist_total = (best.total - best.build) / ceiling_s - 1
    summary = {
        "images": n,
        "models": [s.name for s in specs],
        "backend": backend,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "ceiling_s": ceiling_s,
        "ceiling_img_s": n / ceiling_s,
        "e2e_loop_s": loop_s,
        "e2e_prepare_s": best.prepare,
        "loader_wait_s": best.wait,
        "distance_loop": dist_loop,
        "distance_with_prepare": dist_total,
        "serial_loading_s": loading,
        "ceilings": ceilings,
        "runs": [s.as_dict() for s in runs],
        "machine": info,
    }
    write_json(a.out.with_suffix(".json"), {"summary": summary, "stages": rows})
    write_csv(a.out.with_suffix(".csv"), rows)
    md = [
        "# Where the time of a scoring run goes",
        "",
        f"Generated by `python -m audit.bench stages` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"{n} images of `{a.dataset.name}`, {', '.join(s.name for s in specs)}, backend `{backend}`, "
        f"batch {a.batch_size}, {a.workers} loader workers. Each stage measured on its own, serially, over the "
        "whole set (loading stages in one thread; in a run they happen in the loader workers, overlapped with "
        "the forward passes).",
        "",
        md_table(rows),
        "",
        "| measure | seconds | images/s |",
        "|---|---|---|",
        f"| forward-only ceiling (random uint8 batches, same runners, same batch count) | {ceiling_s:.1f} | "
        f"{n / ceiling_s:.1f} |",
        f"| end to end, scoring loop (load + forward + write + assemble) | {loop_s:.1f} | {n / loop_s:.1f} |",
        f"| end to end, with model preparation | {best.total - best.build:.1f} | {n / (best.total - best.build):.1f} |",
        f"| of which the main process waited for the loader | {best.wait:.1f} | |",
        "",
        f"**End to end is {dist_loop:+.1%} from the forward-only ceiling "
        f"({dist_total:+.1%} counting the one-off model preparation).** Serial loading costs {loading:.1f} s of "
        f"CPU ({loading / ceiling_s:.0%} of the forward time); in the run the main process waited {best.wait:.1f} s "
        "for it: the rest was hidden behind compute.",
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0
