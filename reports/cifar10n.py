"""Any label space, measured: CIFAR-10N's real human label noise, baseline vs ``audit`` side by side.

The shared set ``../shared/datasets/cifar10n-train-10k`` holds 10,000 CIFAR-10 training
images, their clean labels (the truth) and three real noisy label sets from CIFAR-10N
(aggre 9.0%, random1 17.1%, worst 39.6% wrong). For each noisy set this script:

* runs the product: ``audit run DATASET --labels labels_<set>.csv --truth labels_clean.csv``
  (custom label space: cross-validated heads on the zoo's features, cleanlab flags), and
  reads the heads' accuracy against the truth and the flags' AP against (given != truth)
  from ``audit metrics``;
* runs the baseline of the shared README by hand on the same Lite0 features (10-fold
  ``sklearn.linear_model.LogisticRegression``, ``cleanlab.rank.get_label_quality_scores``);
* prints both beside the issue's goals (head accuracy >= 88%; AP >= 0.80 / 0.88 / 0.93).

The three runs share one workspace, so the images are scored once (later runs only refit
the heads on the new labels). Writes ``reports/cifar10n.md`` and ``reports/cifar10n.csv``.

Usage::

    .venv/bin/python reports/cifar10n.py [--models a,b,c] [--db reports/workspace/cifar10n.duckdb] [--sets aggre,...]

Exits 0 with a message when ``../shared`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "cifar10n-train-10k"
OUT_MD = ROOT / "reports" / "cifar10n.md"
OUT_CSV = ROOT / "reports" / "cifar10n.csv"
OUT_HEADS = ROOT / "reports" / "cifar10n_heads"
SETS = ("aggre", "random1", "worst")
# The goals for the product, and the baseline it quotes (shared README), per noisy set.
GOAL_AP = {"aggre": 0.80, "random1": 0.88, "worst": 0.93}
GOAL_HEAD_ACC = 0.88
QUOTED_BASELINE_AP = {"aggre": 0.57, "random1": 0.77, "worst": 0.86}
MODELS = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,squeezenet1_1"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _audit(*args: str) -> str:
    cmd = [sys.executable, "-m", "audit.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    sys.stderr.write(res.stderr[-4000:])
    return res.stdout


def _read_labels(path: Path, keys: list[str]) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    ids = [r["path"] for r in rows]
    index = {k: i for i, k in enumerate(keys)}
    return ids, np.array([index[r["label"]] for r in rows])


def _baseline(features: np.ndarray, given: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """The shared README's recipe by hand: 10-fold logistic regression on Lite0 features, cleanlab."""
    import cleanlab.rank
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    probs = cross_val_predict(
        LogisticRegression(max_iter=1000),
        x,
        given,
        cv=StratifiedKFold(10, shuffle=True, random_state=0),
        method="predict_proba",
    )
    q = cleanlab.rank.get_label_quality_scores(given, probs)
    return {
        "head_acc_vs_truth": float((probs.argmax(1) == clean).mean()),
        "ap": float(average_precision_score(given != clean, 1 - q)),
    }


def _metric(rows: list[dict[str, Any]], model: str, evaluation: str, metric: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["evaluation"] == evaluation and r["metric"] == metric:
            return float(r["value"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=MODELS)
    p.add_argument("--db", type=Path, default=ROOT / "reports" / "workspace" / "cifar10n.duckdb")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument(
        "--heads-set", default="aggre", help="after this set's run, `audit heads` (the seed's table); '' skips"
    )
    a = p.parse_args(argv)
    if not DATASET.is_dir():
        print(f"skipped: {DATASET} not found; this report needs the shared CIFAR-10N set (../shared)")
        return 0
    from audit.scoring import model_key
    from audit.store import arrays_dir, connect

    a.db.parent.mkdir(parents=True, exist_ok=True)
    clean_file = DATASET / "labels_clean.csv"
    results = []
    for name in a.sets.split(","):
        t0 = time.time()
        _audit("run", str(DATASET), "--labels", str(DATASET / f"labels_{name}.csv"), "--truth", str(clean_file),
               "--models", a.models, "--db", str(a.db), "-q")  # fmt: skip
        seconds = time.time() - t0
        rows = json.loads(_audit("metrics", "--db", str(a.db), "--format", "json"))
        heads = sorted({r["model"] for r in rows if r["model"].endswith("-head")})
        best = max(heads, key=lambda m: _metric(rows, m, "truth", "top1") or 0.0) if heads else None
        row: dict[str, Any] = {
            "labels": name,
            "run_s": round(seconds, 1),
            "ensemble_acc_vs_truth": _metric(rows, "ensemble", "truth", "top1"),
            "best_head": best,
            "best_head_acc_vs_truth": _metric(rows, best, "truth", "top1") if best else None,
            "flags_ap": _metric(rows, "ensemble", "flags_vs_truth", "ap"),
            "flags_precision": _metric(rows, "ensemble", "flags_vs_truth", "precision"),
            "flags_recall": _metric(rows, "ensemble", "flags_vs_truth", "recall"),
            "goal_ap": GOAL_AP.get(name),
        }
        # The baseline on the same Lite0 features the product's forward pass stored.
        lite0 = next(m for m in a.models.split(",") if "lite0" in m)
        from audit.zoo import resolve_model

        feats = np.load(arrays_dir(a.db) / f"{model_key(resolve_model(lite0).name)}.features.npy").astype(np.float32)
        class_keys = sorted({r["label"] for r in csv.DictReader(clean_file.open())})
        ids_given, given = _read_labels(DATASET / f"labels_{name}.csv", class_keys)
        ids_clean, clean = _read_labels(clean_file, class_keys)
        # Rows of the features follow the workspace's image_index.
        with connect(a.db, read_only=True) as con:
            ws_ids = [r[0] for r in con.execute("SELECT image_id FROM images ORDER BY image_index").fetchall()]
        pos_g = {k: i for i, k in enumerate(ids_given)}
        pos_c = {k: i for i, k in enumerate(ids_clean)}
        given = given[[pos_g[k] for k in ws_ids]]
        clean = clean[[pos_c[k] for k in ws_ids]]
        base = _baseline(feats, given, clean)
        row["baseline_head_acc_vs_truth"] = base["head_acc_vs_truth"]
        row["baseline_ap"] = base["ap"]
        row["quoted_baseline_ap"] = QUOTED_BASELINE_AP.get(name)
        results.append(row)
        print(json.dumps(row), flush=True)
        _write(results, a.models)  # after every set: a long run stopped early still leaves its finished rows
        if name == a.heads_set:
            _heads_report(a.db, name, a.models)

    return 0


def _write(results: list[dict[str, Any]], models: str) -> None:
    cols = list(results[0])
    with OUT_CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(results)

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    md = [
        "# CIFAR-10N: heads and flags against the clean labels",
        "",
        f"Generated by `reports/cifar10n.py`: `audit run {DATASET.name} --labels labels_<set>.csv --truth "
        f"labels_clean.csv --models {models}` (one workspace, images scored once; the default `--crop auto` "
        "resizes the 32 px images whole to each model's input), beside the shared README's "
        "baseline by hand on the same Lite0 features (10-fold logistic regression, cleanlab's default label "
        "quality). AP = average precision of 1 - label_quality against (given != clean).",
        f"Goals: head accuracy >= {GOAL_HEAD_ACC:.2f} against the clean labels; AP >= "
        + ", ".join(f"{k} {v:.2f}" for k, v in GOAL_AP.items())
        + ".",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in results]
    OUT_MD.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _heads_report(db: Path, name: str, models: str) -> None:
    """``audit heads`` on the workspace as this set's run left it: the seed's "+Sigmoid / +Clean / +Both" table."""
    t0 = time.time()
    text = _audit("heads", "--db", str(db), "--format", "csv")
    seconds = time.time() - t0
    OUT_HEADS.with_suffix(".csv").write_text(text)
    rows = list(csv.DictReader(text.splitlines()))
    cols = ["model", "head", "labels", "n_train", "C", "given_top1", "truth_top1", "truth_low", "truth_high"]

    def cell(r: dict[str, str], c: str) -> str:
        try:
            return f"{float(r[c]):.4f}" if c not in ("n_train",) and c != "C" else r[c]
        except ValueError:
            return r[c]

    by = {(r["model"], r["head"], r["labels"]): float(r["truth_top1"]) for r in rows}
    arms = {"baseline": ("softmax", "given"), "+Sigmoid": ("sigmoid", "given"), "+Clean": ("softmax", "clean"),
            "+Both": ("sigmoid", "clean")}  # fmt: skip
    feats = sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m))
    lines = []
    for m in feats:
        acc = {k: by[(m, *v)] for k, v in arms.items()}
        best = max(acc, key=lambda k: acc[k])
        lines.append(
            f"- `{m}`: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()) + f" (best: {best}; "
            f"+Sigmoid {acc['+Sigmoid'] - acc['baseline']:+.4f}, +Clean {acc['+Clean'] - acc['baseline']:+.4f}, "
            f"+Both {acc['+Both'] - acc['baseline']:+.4f})"
        )
    n_both = sum(max(arms, key=lambda k: by[(m, *arms[k])]) == "+Both" for m in feats)
    n_clean = sum(by[(m, "softmax", "clean")] > by[(m, "softmax", "given")] for m in feats)
    n_sig = sum(by[(m, "sigmoid", "given")] > by[(m, "softmax", "given")] for m in feats)
    md = [
        f'# CIFAR-10N ({name}): the seed\'s "+Sigmoid / +Clean / +Both" table, on heads',
        "",
        f"Generated by `reports/cifar10n.py` ({time.strftime('%Y-%m-%d %H:%M')}): after `audit run` on "
        f"`labels_{name}.csv` with `--truth labels_clean.csv --models {models}`, `audit heads --db WS --format csv` "
        f"({seconds:.0f} s). Each row: a head trained out of fold on the given labels or on the cleaned ones "
        "(flagged images without a review dropped), evaluated against the given labels and the truth (the clean "
        "labels), top-1 with 95% Wilson intervals.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    md += [
        "",
        "## Does the seed's finding hold here?",
        "",
        "Accuracy against the truth, per feature set (baseline = softmax head on the given labels):",
        "",
        *lines,
        "",
        f"Cleaned training labels beat the given ones for {n_clean} of {len(feats)} feature sets; the sigmoid "
        f"head beats the softmax head for {n_sig} of {len(feats)}; both together are the best of the four for "
        f"{n_both} of {len(feats)}. The seed (ResNet-50/152 trained on ImageNet) found both levers help and both "
        "together most; read the differences above against the intervals in the table (about +-0.8 points at "
        "10,000 images).",
    ]
    OUT_HEADS.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
