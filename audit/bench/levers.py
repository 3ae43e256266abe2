"""Each speed lever measured on its own.

Two tables:

* **End to end** (the three models over the whole set, each configuration in a
  fresh process): the baseline loop, then ``audit``'s scoring path with one
  lever changed at a time (decode once with eager NCHW, channels_last, the
  ONNX Runtime and OpenVINO backends, loader workers, batch size, bf16).
* **Forward only** (one model, random batches, in one process, variants
  interleaved): eager NCHW vs channels_last, thread counts, ``torch.compile``,
  ONNX Runtime, OpenVINO, bf16 autocast.

Agreement is the share of images whose argmax equals the fp32 default's;
``max |dp|`` the largest change of any probability.
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
    run_child,
    write_csv,
    write_json,
)

# label, audit arm options ("baseline" for the validate.py loop)
E2E: list[tuple[str, list[str] | None]] = [
    ("decode once, all models; torch eager NCHW", ["--backend", "torch", "--no-channels-last"]),
    ("+ channels_last (torch)", ["--backend", "torch"]),
    ("+ ONNX Runtime backend (fp32)", ["--backend", "onnxruntime"]),
    ("+ OpenVINO backend (fp32) = default", ["--backend", "openvino"]),
    ("OpenVINO, 0 loader workers (load in the main process)", ["--backend", "openvino", "--workers", "0"]),
    ("OpenVINO, 1 loader worker", ["--backend", "openvino", "--workers", "1"]),
    ("OpenVINO, batch 16", ["--backend", "openvino", "--batch-size", "16"]),
    ("OpenVINO, batch 128", ["--backend", "openvino", "--batch-size", "128"]),
]
REFERENCE = "+ OpenVINO backend (fp32) = default"


def _max_dp(r: dict[str, Any], ref: dict[str, Any], m: str) -> float:
    a = np.load(Path(r["probs_dir"]) / f"{m}.npy")
    b = np.load(Path(ref["probs_dir"]) / f"{m}.npy")
    return float(np.nanmax(np.abs(a - b)))


def _e2e(a: argparse.Namespace, probs_dir: Path) -> list[dict[str, Any]]:
    common = ["--dataset", str(a.dataset), "--models", a.models] + (["--limit", str(a.limit)] if a.limit else [])
    rows, results = [], {}
    for label, opts in E2E:
        if a.only and not any(k in label for k in a.only.split(",")):
            continue
        print(f"{label} ...", flush=True)
        if opts is None:
            r = run_child(["arm", "baseline", *common, "--batch-size", str(a.batch_size), "--workers", str(a.workers)])
        else:
            opts = list(opts)
            if "--workers" not in opts:
                opts += ["--workers", str(a.workers)]
            if "--batch-size" not in opts:
                opts += ["--batch-size", str(a.batch_size)]
            save = probs_dir / str(len(results))
            r = run_child(["arm", "audit", *common, *opts, "--save-probs", str(save)])
            r["probs_dir"] = str(save)
        results[label] = r
        print(f"  {r['wall_s']:.1f} s", flush=True)
    ref = results.get(REFERENCE)
    base_img_s = None
    if a.baseline.exists():
        import json

        rows_b = json.loads(a.baseline.read_text())["rows"]
        base_img_s = float(np.median([r["baseline_img_s"] for r in rows_b]))
        rows.append({"lever": f"baseline: validate.py loop per model (from {a.baseline.name}, all images)",
                     "images/s": round(base_img_s, 2), "vs baseline": 1.0})  # fmt: skip
    for label, r in results.items():
        n = r["images"]
        row: dict[str, Any] = {
            "lever": label,
            "wall_s": round(r["wall_s"], 1),
            "images/s": round(n / r["wall_s"], 2),
            "vs baseline": round(n / r["wall_s"] / base_img_s, 2) if base_img_s else "",
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_pss_tree_mib": r.get("peak_tree_pss_mib"),
        }
        if "stats" in r:
            row["forward_s"] = round(sum(r["stats"]["forward"].values()), 1)
            row["prepare_s"] = round(r["stats"]["prepare"], 1)
            row["loader_wait_s"] = round(r["stats"]["wait"], 1)
        if ref is not None:
            agree = [
                float(np.mean(np.array(r["models"][m]["argmax"]) == np.array(ref["models"][m]["argmax"])))
                for m in r["models"]
            ]
            row["agreement vs fp32 default"] = round(min(agree), 5)
            if "probs_dir" in r and "probs_dir" in ref:
                row["max |dp|"] = round(max(_max_dp(r, ref, m) for m in r["models"]), 6)
        rows.append(row)
    return rows


def _forward(model: str, batch_size: int, reps: int, compile_: bool, bf16: bool) -> list[dict[str, Any]]:
    import torch

    from audit.scoring import make_runner, normalize
    from audit.zoo import build_model, resolve_model

    spec = resolve_model(model)
    pre = spec.preprocess
    assert pre is not None
    rng = np.random.default_rng(0)
    u8 = torch.from_numpy(rng.integers(0, 256, (batch_size, pre.crop, pre.crop, 3), dtype=np.uint8))
    eager = build_model(spec)
    x_nchw = normalize(u8, pre, channels_last=False)
    with torch.inference_mode():
        ref = eager(x_nchw).numpy()
    variants: dict[str, Any] = {}
    setup: dict[str, float] = {}

    def add(name: str, make: Any) -> None:
        t = time.perf_counter()
        fn = make()
        fn()  # warm (and compile)
        setup[name] = time.perf_counter() - t
        variants[name] = fn

    def eager_fn(m: Any, cl: bool, threads: int | None = None, bf16: bool = False) -> Any:
        xin = x_nchw.contiguous(memory_format=torch.channels_last) if cl else x_nchw

        def f() -> Any:
            old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return m(xin).float().numpy()
            finally:
                torch.set_num_threads(old)

        return f

    add("torch eager NCHW fp32 (baseline forward)", lambda: eager_fn(eager, False))
    add("torch eager NCHW fp32, 1 thread", lambda: eager_fn(eager, False, threads=1))
    cl_model = build_model(spec).to(memory_format=torch.channels_last)
    add("torch channels_last fp32", lambda: eager_fn(cl_model, True))
    if compile_:
        add("torch.compile (inductor) channels_last fp32", lambda: eager_fn(torch.compile(cl_model), True))
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        try:
            r = make_runner(build_model(spec), spec, backend=backend, precision=precision)
        except Exception as e:  # not installed
            print(f"skipping {backend}: {e}")
            continue
        label = f"{backend} {precision}" + (" (opt-in)" if precision != "fp32" else "")
        if hasattr(r, "inference_precision"):
            label += f" [plugin runs {r.inference_precision}]"
        add(label, lambda r=r: lambda: r(u8).numpy())
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, f in variants.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    base = min(times["torch eager NCHW fp32 (baseline forward)"])
    rows: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    if bf16:
        # Measured once on 8 images: without native bf16 in the CPU, autocast is emulated and very slow.
        k = 8
        xin = x_nchw[:k].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = time.perf_counter()
            cl_model(xin[:1])
            warm = time.perf_counter() - t
            t = time.perf_counter()
            out = cl_model(xin).float().numpy()
            sec = time.perf_counter() - t
        extra.append(
            {
                "variant": f"torch channels_last bf16 autocast (opt-in; once, {k} images)",
                "images/s": round(k / sec, 2),
                "vs eager NCHW": round((base / batch_size) / (sec / k), 2),
                "setup_s (build/compile + first batch)": round(warm, 1),
                "argmax agreement vs eager": round(float(np.mean(out.argmax(1) == ref[:k].argmax(1))), 4),
                "max |dlogit|": round(float(np.abs(out - ref[:k]).max()), 5),
            }
        )
    for k, f in variants.items():
        out = f()
        rows.append(
            {
                "variant": k,
                "images/s": round(batch_size / min(times[k]), 1),
                "vs eager NCHW": round(base / min(times[k]), 2),
                "setup_s (build/compile + first batch)": round(setup[k], 1),
                "argmax agreement vs eager": round(float(np.mean(out.argmax(1) == ref.argmax(1))), 4),
                "max |dlogit|": round(float(np.abs(out - ref).max()), 5),
            }
        )
    return rows + extra


def render(
    a: argparse.Namespace, info: dict[str, Any], fwd: list[dict[str, Any]], e2e: list[dict[str, Any]]
) -> list[str]:
    """The report's lines."""
    md = [
        "# Speed levers, one at a time",
        "",
        f"Generated by `python -m audit.bench levers` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"## Forward only: {a.forward_model}, batch {a.batch_size}, random input (best of {a.reps}, interleaved)",
        "",
        md_table(fwd),
        "",
    ]
    if e2e:
        md += [
            f"## End to end: {', '.join(a.models.split(','))} on "
            f"{f'{a.limit} images (evenly spaced) of ' if a.limit else ''}`{a.dataset.name}`, "
            f"batch {a.batch_size}, {a.workers} workers unless stated",
            "",
            "Each row a fresh process, run one after another (other processes on the machine add noise of "
            "about 10-20%; `perf_scoring.md` alternates baseline and default to cancel it). 'vs baseline' is "
            "images/s over the baseline loop's images/s from `perf_scoring.json`. Agreement and max |dp| are "
            "against the fp32 default row.",
            "",
            md_table(e2e),
            "",
        ]
    return md


def levers(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench levers", description=__doc__.split("\n\n")[0])
    add_run_args(p, backend=False)
    p.add_argument("--forward-model", default="efficientnet_lite0")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the forward table")
    p.add_argument("--no-bf16", action="store_true", help="leave bf16 autocast out of the forward table")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--only", help="comma-separated substrings of the end-to-end levers to run")
    p.add_argument("--limit", type=int, default=650, help="images for the end-to-end table (evenly spaced)")
    p.add_argument("--baseline", type=Path, default=REPORTS / "perf_scoring.json", help="baseline from 'scoring'")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_levers")
    a = p.parse_args(argv)
    if not a.dataset.is_dir():
        print(f"skipped: {a.dataset} not found (the shared 1,300-image set lives in ../shared)")
        return 0
    info = machine()
    print(f"forward only: {a.forward_model}, batch {a.batch_size} ...", flush=True)
    fwd = _forward(a.forward_model, a.batch_size, a.reps, not a.no_compile, not a.no_bf16)
    print(md_table(fwd), flush=True)
    e2e: list[dict[str, Any]] = []
    if not a.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            e2e = _e2e(a, Path(tmp))
    write_json(a.out.with_suffix(".json"), {"machine": info, "forward": fwd, "e2e": e2e})
    write_csv(a.out.with_name(a.out.name + "_forward.csv"), fwd)
    if e2e:
        write_csv(a.out.with_suffix(".csv"), e2e)
    md = render(a, info, fwd, e2e)
    a.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0
