"""Scoring side by side: timm's validate.py loop once per model vs ``audit run``'s scoring path.

Each arm runs in a fresh process, the arms alternate (baseline, audit,
baseline, audit, ...) so that load from other processes hits both alike, and
the result table says images/s, the ratio, peak memory and the top-1 (argmax)
agreement of every model between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.bench.common import (
    REPORTS,
    TreeMemory,
    add_run_args,
    machine,
    machine_md,
    md_table,
    peak_rss_mib,
    run_child,
    write_csv,
    write_json,
)

# --------------------------------------------------------------------------- arms (run in a child process)


def baseline_arm(dataset: Path, models: list[str], batch_size: int, workers: int) -> dict[str, Any]:
    """What a user does today: timm's validate.py loop, one full pass per model.

    Follows validate.py: ``create_dataset`` (ImageFolder reader, ``--class-map``
    of the 1,000 wnids so labels are the standard ImageNet indices),
    ``resolve_data_config`` from the model's pretrained config,
    ``create_loader`` with its defaults (prefetcher: uint8 batches normalised
    in the main process), ``model.eval()``, a warm-up batch, then the loop
    under ``torch.no_grad()`` with the loss and top-1/top-5 accuracy, fp32,
    NCHW, the same number of workers.
    """
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.utils import accuracy

    from audit.datasets import imagenet_label_space, load_dataset
    from audit.zoo import build_model, resolve_model

    ds = load_dataset(dataset, real=False)  # only for the image ids and the root folder
    class_map = {w: i for i, w in enumerate(imagenet_label_space().keys)}
    out: dict[str, Any] = {"arm": "baseline", "models": {}, "images": len(ds)}
    t_all = time.perf_counter()
    with TreeMemory() as mem:
        for name in models:
            t0 = time.perf_counter()
            model = build_model(resolve_model(name))
            data_config = resolve_data_config({}, model=model, use_test_size=True)
            tds = create_dataset(name="", root=str(ds.root), split="validation", class_map=class_map)
            loader = create_loader(
                tds,
                input_size=data_config["input_size"],
                batch_size=batch_size,
                use_prefetcher=True,
                interpolation=data_config["interpolation"],
                mean=data_config["mean"],
                std=data_config["std"],
                num_workers=workers,
                crop_pct=data_config["crop_pct"],
                crop_mode=data_config["crop_mode"],
                pin_memory=False,
                device=torch.device("cpu"),
            )
            model.eval()
            criterion = torch.nn.CrossEntropyLoss()
            top1 = []
            correct = 0
            with torch.no_grad():
                model(torch.randn((batch_size, *data_config["input_size"])))  # validate.py's warm-up
                for inp, target in loader:
                    output = model(inp)
                    criterion(output, target)
                    acc1, _ = accuracy(output, target, topk=(1, 5))
                    correct += float(acc1) * len(target) / 100
                    top1.append(output.argmax(1).numpy())
            files = [Path(tds.filename(i, absolute=True)).resolve() for i in range(len(tds))]
            pos = {p: k for k, p in enumerate(files)}
            pred = np.concatenate(top1)[[pos[(ds.root / i).resolve()] for i in ds.image_ids]]
            out["models"][name] = {
                "wall_s": time.perf_counter() - t0,
                "top1_acc": correct / len(tds),
                "argmax": pred.tolist(),
            }
            del loader, model
    out["wall_s"] = time.perf_counter() - t_all
    out["peak_tree_pss_mib"] = mem.peak_mib
    out.update(peak_rss_mib())
    return out


def audit_arm(
    dataset: Path,
    models: list[str],
    batch_size: int,
    workers: int,
    backend: str,
    precision: str,
    channels_last: bool = True,
    limit: int | None = None,
    threads: int | None = None,
    save_probs: Path | None = None,
    features: bool = True,
    pixels: bool = True,
) -> dict[str, Any]:
    """``audit run``'s scoring path: load the dataset, build the models, score into a fresh workspace."""
    from audit.datasets import load_dataset
    from audit.scoring import ScoreStats, load_models, score_dataset
    from audit.zoo import resolve_model

    out: dict[str, Any] = {"arm": "audit", "models": {}, "features": features, "pixels": pixels}
    with tempfile.TemporaryDirectory() as tmp, TreeMemory() as mem:
        t0 = time.perf_counter()
        ds = load_dataset(dataset, limit=limit)
        specs = [resolve_model(m) for m in models]
        st = ScoreStats()
        t = time.perf_counter()
        built = load_models(specs)
        st.build = time.perf_counter() - t
        arrays = score_dataset(
            ds,
            specs,
            Path(tmp) / "arrays",
            batch_size=batch_size,
            workers=workers,
            progress=False,
            models=built,
            backend=backend,
            precision=precision,
            channels_last=channels_last,
            threads=threads,
            stats=st,
            features=features,
            pixels=pixels,
        )
        out["wall_s"] = time.perf_counter() - t0
        for name, a in zip(models, arrays, strict=True):
            probs = np.load(a.probs, mmap_mode="r")
            am = np.asarray(probs).argmax(1)
            out["models"][name] = {"top1_acc": float((am == ds.labels).mean()), "argmax": am.tolist()}
            if save_probs is not None:
                save_probs.mkdir(parents=True, exist_ok=True)
                np.save(save_probs / f"{name}.npy", np.asarray(probs))
        out["images"] = len(ds)
        out["stats"] = st.as_dict()
    out["peak_tree_pss_mib"] = mem.peak_mib
    out.update(peak_rss_mib())
    return out


# --------------------------------------------------------------------------- side by side


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {
        m: float(np.mean(np.array(a["models"][m]["argmax"]) == np.array(b["models"][m]["argmax"]))) for m in a["models"]
    }


def scoring(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench scoring", description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--repeats", type=int, default=2, help="baseline/audit pairs, interleaved")
    p.add_argument("--out", type=Path, default=REPORTS / "perf_scoring")
    p.add_argument("--render", type=Path, help="re-render the report from a .raw.json of an earlier run")
    a = p.parse_args(argv)
    if not a.dataset.is_dir() and not a.render:
        print(f"skipped: {a.dataset} not found (the shared 1,300-image set lives in ../shared)")
        return 0
    info = machine()
    common = ["--dataset", str(a.dataset), "--models", a.models, "--batch-size", str(a.batch_size)]
    common += ["--workers", str(a.workers)]
    runs: list[dict[str, Any]] = json.loads(a.render.read_text()) if a.render else []
    for r in range(0 if a.render else a.repeats):
        for arm in ("baseline", "audit"):
            extra = ["--backend", a.backend] if arm == "audit" else []
            print(f"repeat {r + 1}/{a.repeats}: {arm} ...", flush=True)
            res = run_child(["arm", arm, *common, *extra])
            res["repeat"] = r + 1
            runs.append(res)
            write_json(a.out.with_suffix(".raw.json"), runs)
            print(f"  {res['wall_s']:.1f} s", flush=True)
    base = [x for x in runs if x["arm"] == "baseline"]
    ours = [x for x in runs if x["arm"] == "audit"]
    n = ours[0]["images"]
    rows = []
    for b, o in zip(base, ours, strict=True):
        agree = _agreement(b, o)
        rows.append(
            {
                "repeat": b["repeat"],
                "baseline_s": round(b["wall_s"], 1),
                "audit_s": round(o["wall_s"], 1),
                "baseline_img_s": round(n / b["wall_s"], 2),
                "audit_img_s": round(n / o["wall_s"], 2),
                "ratio": round(b["wall_s"] / o["wall_s"], 2),
                "min_agreement": round(min(agree.values()), 5),
                "baseline_peak_rss_mib": b["peak_rss_mib"],
                "audit_peak_rss_mib": o["peak_rss_mib"],
                "baseline_peak_tree_pss_mib": b["peak_tree_pss_mib"],
                "audit_peak_tree_pss_mib": o["peak_tree_pss_mib"],
                "backend": o["stats"]["backend"],
                "load avg 1-min at end (baseline/audit)": "/".join(
                    str(x.get("loadavg_1_5_15_at_end", ["?"])[0]) for x in (b, o)
                ),
            }
        )
    models = list(base[0]["models"])
    per_model = []
    for j, m in enumerate(models):
        per_model.append(
            {
                "model": m,
                "baseline_s (per pass)": round(float(np.median([b["models"][m]["wall_s"] for b in base])), 1),
                "audit forward_s": round(float(np.median([list(o["stats"]["forward"].values())[j] for o in ours])), 1),
                "baseline top1": round(base[0]["models"][m]["top1_acc"], 4),
                "audit top1": round(ours[0]["models"][m]["top1_acc"], 4),
                "argmax agreement": round(
                    float(np.mean([_agreement(b, o)[m] for b, o in zip(base, ours, strict=True)])), 5
                ),
            }
        )
    ratio = float(np.median([r["ratio"] for r in rows]))
    summary = {
        "images": n,
        "models": models,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "median_ratio": ratio,
        "min_agreement": min(r["min_agreement"] for r in rows),
        "machine": info,
    }
    for r in runs:
        for m in r["models"].values():
            m.pop("argmax", None)
    write_json(a.out.with_suffix(".json"), {"summary": summary, "rows": rows, "per_model": per_model, "runs": runs})
    write_csv(a.out.with_suffix(".csv"), rows)
    md = [
        "# Scoring: timm validate.py loop per model vs `audit run`'s scoring path",
        "",
        f"Generated by `python -m audit.bench scoring` on {time.strftime('%Y-%m-%d %H:%M')}. {machine_md(info)}",
        "",
        f"{n} images of `{a.dataset.name}`, models {', '.join(models)}, batch {a.batch_size}, "
        f"{a.workers} loader workers on both sides; arms alternate in fresh processes. "
        f"Baseline: one validate.py-style pass per model (timm create_dataset/create_loader, fp32, eager, NCHW). "
        f"audit: one decode pass, all models, backend `{rows[0]['backend']}`, fp32. "
        "Wall times include building the models (and, for audit, exporting and compiling them). "
        "images/s = images fully scored by every model per second.",
        "",
        md_table(rows),
        "",
        md_table(per_model),
        "",
        f"**Median ratio {ratio:.2f}x; lowest argmax agreement {summary['min_agreement']:.4%}.**",
        "",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md))
    a.out.with_suffix(".raw.json").unlink(missing_ok=True)
    print("\n".join(md))
    return 0


def arm(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.bench arm")
    p.add_argument("kind", choices=["baseline", "audit"])
    add_run_args(p)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--save-probs", type=Path)
    p.add_argument("--no-features", action="store_true")
    p.add_argument("--no-pixels", action="store_true")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    if a.kind == "baseline":
        res = baseline_arm(a.dataset, models, a.batch_size, a.workers)
    else:
        res = audit_arm(
            a.dataset, models, a.batch_size, a.workers, a.backend, a.precision, not a.no_channels_last, a.limit,
            a.threads, a.save_probs, not a.no_features, not a.no_pixels,
        )  # fmt: skip
    res["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(a.json, res)
    return 0
