"""Command line: ``audit run | models | checks | metrics | issues | runs | heads | export | review | duplicates |
dashboard``.

Machine-readable output goes to stdout; progress and logs go to stderr. A
mistake the user can fix prints one line naming it and the fix, and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from audit import __version__, _options
from audit.errors import OptionError, UserError, disk_error, is_disk_error
from audit.zoo import CROP_MODES

__all__ = ["main"]

_DEFAULT_MODELS = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,squeezenet1_1"
# Where the main job looks for a dataset when none is given, in order.
_SAMPLE_CANDIDATES = (Path("../shared/datasets/imagenet-val-1300"), Path("data/imagenette2-320/val"))


def _default_dataset() -> Path:
    for p in _SAMPLE_CANDIDATES:
        if p.is_dir():
            return p
    from audit.sample import fetch_imagenette

    return fetch_imagenette(Path("data"))


def _emit(df: pd.DataFrame, fmt: str) -> None:
    if fmt == "csv":
        from audit._csvsafe import frame_to_csv

        # Spreadsheet-safe (formula cells neutralised, text quoted); --format json is the lossless form.
        sys.stdout.write(frame_to_csv(df))
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", indent=1, date_format="iso") + "\n")
    elif df.empty:
        sys.stdout.write("  ".join(map(str, df.columns)) + "\n")  # the header, not pandas' "Empty DataFrame"
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            sys.stdout.write(df.to_string(index=False) + "\n")


def _metrics_view(df: pd.DataFrame, fmt: str) -> pd.DataFrame:
    df = df.drop(columns=["params"], errors="ignore")
    if fmt == "table":
        df = df.copy()
        for c in ("value", "low", "high"):
            df[c] = (df[c] * 100).map(lambda v: f"{v:.1f}%" if pd.notna(v) else "-")
    return df


def _emit_metrics(df: pd.DataFrame, fmt: str) -> None:
    if df.empty and fmt == "table":
        # An empty table prints as pandas' "Empty DataFrame"; say what it means instead.
        print(
            "audit: no metrics: no model of this workspace predicts its classes; "
            "pass 'audit run' a checkpoint trained on them",
            file=sys.stderr,
        )
        return
    _emit(_metrics_view(df, fmt), fmt)


def _absolute(path: str | None) -> str | None:
    # Recorded absolute, so that a bare re-run from another folder finds the same files.
    return str(Path(path).expanduser().resolve()) if path else None


def _check_options(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``--check-option NAME.KEY=VALUE`` (repeatable) as ``{NAME: {KEY: VALUE}}``; VALUE read as JSON when it is."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        m = re.fullmatch(r"\s*([A-Za-z_][\w]*)\.([A-Za-z_][\w]*)\s*=(.*)", item, re.S)
        if m is None:
            raise OptionError(
                f"--check-option {item!r}: expected NAME.OPTION=VALUE, e.g. --check-option label.weights=fit"
            )
        text = m.group(3).strip()
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text  # a bare word: fit, equal, normalized_margin
        out.setdefault(m.group(1), {})[m.group(2)] = value
    return out


def cmd_run(a: argparse.Namespace) -> int:
    from audit.datasets import dataset_folder, load_dataset

    if a.dataset:
        dataset_folder(a.dataset)  # a mistyped folder is said at once, before torch and cleanlab load (~10 s)
    from audit.config import ChecksConfig, HeadsConfig, MapConfig, RunConfig, ScoringConfig
    from audit.pipeline import check_workspace_outside, last_run_inputs, run_audit
    from audit.zoo import resolve_model

    prev = last_run_inputs(a.db)
    checks = a.checks if a.checks is not None else (prev or {}).get("checks")
    check_options = _check_options(a.check_option) if a.check_option else (prev or {}).get("check_options") or {}
    labels, real, limit = a.labels, a.real, a.limit
    space, classes, truth = a.label_space, a.classes, a.truth
    heads, folds, crop = a.heads, a.folds, a.crop
    reference = a.reference
    if a.dataset:
        root = Path(a.dataset)
    elif prev:
        # A bare `audit run --db WS` continues the workspace: same images, same label file.
        root = Path(prev["dataset"])
        labels = labels or prev.get("labels")
        real = real or prev.get("real")
        limit = limit if limit is not None else prev.get("limit")
        space = space or prev.get("label_space")
        classes = classes or prev.get("classes")
        truth = truth or prev.get("truth")
        heads = heads if heads is not None else prev.get("heads")
        folds = folds if folds is not None else prev.get("folds")
        crop = crop or prev.get("crop")
        reference = reference or prev.get("reference")
        print(f"audit: continuing workspace {a.db} (dataset {root}, from its last run)", file=sys.stderr)
    else:
        root = _default_dataset()
    # The run's settings, validated once, before the dataset is read or anything written (audit.config).
    config = RunConfig(
        scoring=ScoringConfig(
            batch_size=a.batch_size,
            workers=a.workers,
            device=a.device,
            backend=a.backend,
            precision=a.precision,
            features=a.features,
            crop=crop or "auto",
            engine=a.engine,
            ray_address=a.ray_address,
            ray_actors=a.ray_actors,
            ray_cpus_per_actor=a.ray_cpus_per_actor,
            ray_gpus_per_actor=a.ray_gpus_per_actor,
        ),
        heads=HeadsConfig(enabled=heads, folds=folds if folds is not None else 10),
        checks=ChecksConfig(names=checks, options=check_options),
        map=MapConfig(enabled=a.map, model=a.map_model, method=a.map_method),
        sigmoid_threshold=a.sigmoid_threshold,
    )
    # Before the dataset is read: a workspace inside it would change what is read.
    check_workspace_outside(root, a.db)
    ds = load_dataset(
        root, label_file=labels, real=real, limit=limit, label_space=space or "auto", classes=classes, truth=truth
    )
    if reference:
        from audit.reference import load_reference

        # Read (and refused) before any model is built or image scored, as the set is.
        ref = load_reference(reference, ds)
        print(f"audit: reference set: {len(ref)} images from {ref.root} ({ref.layout})", file=sys.stderr)
    else:
        ref = None
    model_names = a.models if a.models is not None else ",".join(prev["models"]) if prev else _DEFAULT_MODELS
    names = [n.strip() for n in model_names.split(",") if n.strip()]
    if not names:
        raise UserError("--models is empty; name at least one model (see 'audit models')")
    specs = [resolve_model(n) for n in names]
    print(
        f"audit: {len(ds)} images, {len(set(ds.labels.tolist()))} classes from {ds.root} ({ds.layout}); "
        f"{len(specs)} model(s); workspace {a.db}",
        file=sys.stderr,
    )
    res = run_audit(
        ds,
        specs,
        Path(a.db),
        config,
        progress=not a.quiet,
        reference=ref,
        inputs={
            "dataset": _absolute(str(root)),
            "labels": _absolute(labels),
            "real": _absolute(real),
            "limit": limit,
            "label_space": space,
            "classes": _absolute(classes),
            "truth": _absolute(truth),
            "heads": heads,
            "folds": folds,
            "crop": crop,
            "models": names,
            "checks": checks,
            "check_options": check_options or None,
            "reference": _absolute(reference),
        },
    )
    for note in res.skipped:
        print(f"audit: note: {note}", file=sys.stderr)
    for outcome in res.checks:
        print(f"audit: {outcome.line()}", file=sys.stderr)
    for warning in res.warnings:
        print(f"audit: warning: {warning}", file=sys.stderr)
    from audit.queries import metrics_table

    _emit_metrics(metrics_table(Path(a.db)), a.format)
    print(
        f"flagged images: {res.n_flagged} of {len(ds)} (bad images left out: {res.n_bad}); "
        f"review them with 'audit issues --db {a.db}' or 'audit dashboard --db {a.db}'"
    )
    return 0


def cmd_heads(a: argparse.Namespace) -> int:
    from audit.heads_table import heads_table
    from audit.store import check_workspace

    df = heads_table(check_workspace(a.db), folds=a.folds, seed=a.seed)
    if df.empty:
        print(
            "audit: no heads: no model of this workspace has stored features; score zoo models with 'audit run'",
            file=sys.stderr,
        )
        return 0
    if a.format == "table":
        df = df.copy()
        for col in ("given", "truth"):
            df[f"{col} top-1 (95%)"] = [
                "-" if pd.isna(v) else f"{100 * v:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"
                for v, lo, hi in zip(df[f"{col}_top1"], df[f"{col}_low"], df[f"{col}_high"], strict=True)
            ]
        df = df[["model", "head", "labels", "n_train", "C", "given top-1 (95%)", "truth", "truth top-1 (95%)"]]
    _emit(df, a.format)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from audit.zoo import list_models, weights_status

    rows = [
        {
            "model": s.name,
            "source": s.source,
            "input": s.preprocess.crop if s.preprocess else None,
            "loss": s.loss,
            "weights": weights_status(s),
            "file": s.weights_file if weights_status(s) == "available" else (s.weights_file or s.weights_url),
        }
        for s in list_models(a.filter)
    ]
    df = pd.DataFrame(rows)
    if a.available:
        df = df[df["weights"] == "available"]
    _emit(df, a.format)
    return 0


def cmd_metrics(a: argparse.Namespace) -> int:
    from audit.queries import metrics_table

    _emit_metrics(metrics_table(Path(a.db)), a.format)
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    from audit.featuremap import MapSettings, workspace_map

    settings = MapSettings(method=a.method, seed=a.seed)
    model, note = workspace_map(
        a.db, model=a.model, settings=settings, log=lambda m: print(f"audit: {m}", file=sys.stderr)
    )
    if note:
        print(note)
        return 0
    print(f"map of {model} ({a.method}) stored in {a.db}; open the dashboard's Map page")
    return 0


def cmd_checks(a: argparse.Namespace) -> int:
    from audit.checks import list_checks

    rows = [
        {
            "name": c.name,
            # "features|probs": either suffices (Check.needs_any); "labels,probs": both are needed.
            "needs": sorted(c.needs) if a.format == "json" else ("|" if c.needs_any else ",").join(sorted(c.needs)),
            "needs_any": c.needs_any,
            "default": c.default if a.format == "json" else ("on" if c.default else "off"),
            "description": c.description,
        }
        for c in list_checks(a.filter)
    ]
    columns = ["name", "needs", "default", "description"] + (["needs_any"] if a.format == "json" else [])
    _emit(pd.DataFrame(rows, columns=columns), a.format)
    return 0


def cmd_issues(a: argparse.Namespace) -> int:
    from audit.checks import check_name
    from audit.queries import check_issues, check_note

    name = check_name(a.check)  # before the workspace is opened: the cheaper mistake first
    df = check_issues(Path(a.db), name, limit=a.limit)
    if df.empty and name != "label":
        note = check_note(Path(a.db), name)
        if note:
            print(f"audit: note: {note}", file=sys.stderr)
    _emit(df, a.format)
    return 0


def cmd_runs(a: argparse.Namespace) -> int:
    from audit.queries import runs_table

    _emit(runs_table(Path(a.db)), a.format)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from audit.export import export_labels
    from audit.pipeline import check_export_target

    out = check_export_target(a.db, a.out)
    res = export_labels(Path(a.db), out)
    print(
        f"exported {res.n_images} images ({res.n_changed} changed by review, {res.n_excluded} excluded) "
        f"to {res.out}: {', '.join(res.files)}"
    )
    return 0


def cmd_review(a: argparse.Namespace) -> int:
    from audit.queries import resolve_label
    from audit.store import append_decision, label_state

    labels = [resolve_label(Path(a.db), t) for t in (a.labels or "").split(",") if t.strip()]
    did = append_decision(
        Path(a.db), a.image, a.action, labels=labels, reviewer=a.reviewer, reason=a.reason or "", of=a.of
    )
    # What the image's label set is now, by the same fold of the log that the dashboard and export read.
    now = label_state(Path(a.db), a.image)
    shown = " ".join(map(str, now.labels)) if now.labels else "none (excluded)"
    state = "a decision is in effect" if now.reviewed else "no decision in effect, the given label"
    print(f"decision {did} recorded; image {a.image} labels now: {shown} ({state})")
    return 0


def cmd_duplicates(a: argparse.Namespace) -> int:
    from audit import duplicates_view as dv
    from audit.queries import resolve_label

    db = Path(a.db)
    if a.resolution is None:
        if a.keep is not None or a.label is not None:
            raise UserError(
                "--keep and --label go with a resolution, e.g. 'audit duplicates GROUP exclude_copies --keep IMAGE'; "
                "see 'audit duplicates --help'"
            )
        if a.group is not None:  # one group, every member
            _emit(dv.group_rows([dv.group_of(db, a.group)]), a.format)
            return 0
        res = dv.duplicate_groups(db, a.show, 0, a.limit or 2**31 - 1)
        if res["note"]:
            print(f"audit: note: {res['note']}", file=sys.stderr)
        elif not res["counts"]["groups"]:
            print("audit: note: the duplicate checks found no duplicates in this workspace", file=sys.stderr)
        else:
            c = res["counts"]
            print(
                f"audit: {c['groups']:,} duplicate group(s) of {c['images']:,} images: {c['differ']:,} with different "
                f"labels, {c['reference']:,} with copies in the reference set, {c['unresolved']:,} unresolved; "
                f"listing {res['total']:,} ({dv.SHOWS[a.show]})",
                file=sys.stderr,
            )
        _emit(dv.group_rows(res["groups"]), a.format)
        return 0
    if a.group is None:
        raise UserError("a resolution needs the group: 'audit duplicates GROUP RESOLUTION' (GROUP: any image of it)")
    label = resolve_label(db, a.label) if a.label is not None else None
    ids = dv.resolve_group(
        db, a.group, a.resolution, keep=a.keep, label=label, reviewer=a.reviewer, reason=a.reason or ""
    )
    g = dv.group_of(db, a.group)
    state = f"{g['n_kept']} of {g['size']} images in evaluation, {g['n_copies']} excluded as duplicates"
    if ids:
        print(f"group {g['group']}: {len(ids)} decision(s) recorded ({ids[0]}..{ids[-1]}); {state}")
    else:
        print(f"group {g['group']}: nothing to record, it already stands so; {state}")
    return 0


def cmd_dashboard(a: argparse.Namespace) -> int:
    from audit.dashboard.auth import TOKEN_ENV, is_loopback, new_token
    from audit.dashboard.serve import APP, streamlit_command

    if not APP.exists():
        raise UserError(f"app.py not found beside the audit package ({APP}); run from a source checkout")
    if not Path(a.db).exists():
        raise UserError(f"no audit workspace at {a.db}; run 'audit run DATASET --db {a.db}' first")
    env = dict(os.environ, AUDIT_DB=str(Path(a.db).resolve()))
    token = (env.get(TOKEN_ENV) or "").strip()
    if not is_loopback(a.host):
        # Anyone who can reach the address can open the dashboard: decisions need the token.
        print(
            f"audit: warning: --host {a.host or '(every interface)'} makes the dashboard reachable from other "
            "machines (no TLS); anyone there can read the workspace, and writing decisions needs the access token",
            file=sys.stderr,
        )
        if not token:
            token = new_token()
            print(
                f"audit: access token (asked before the first decision; set {TOKEN_ENV} to choose it): {token}",
                file=sys.stderr,
            )
        else:
            print(f"audit: access token from {TOKEN_ENV}", file=sys.stderr)
    if token:
        env[TOKEN_ENV] = token
    print(f"audit: dashboard on http://{a.host}:{a.port} for {a.db}", file=sys.stderr)
    # Become the server (no child left behind when this process is signalled).
    os.execve(sys.executable, streamlit_command(a.host, a.port), env)
    return 0  # pragma: no cover


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and exit code 2, like every other user mistake."""

    def error(self, message: str) -> NoReturn:
        # "argument --workers: --workers must be ..." says the option's name once.
        message = re.sub(r"^argument (\S+): (?=\1 )", "", message)
        self.exit(2, f"audit: error: {message}; see '{self.prog} --help'\n")


def _typed(check: Callable[..., Any], name: str, **kw: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that runs one of :mod:`audit._options`' checks on the option's text."""

    @functools.wraps(check)
    def parse(text: str) -> Any:
        try:
            return check(name, text, **kw)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    from audit.duplicates_view import RESOLUTIONS, SHOWS
    from audit.store import ACTIONS, default_db

    p = _Parser(prog="audit", description="Audit the labels of an image-classification validation set.")
    p.add_argument("--version", action="version", version=f"audit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    db_help = f"audit workspace (DuckDB file; arrays go in <db>.arrays/), default {default_db()}"

    r = sub.add_parser("run", help="score a dataset, evaluate, flag label issues")
    r.add_argument(
        "dataset",
        nargs="?",
        help="dataset folder (ImageFolder, or flat with --labels); default: the workspace's dataset when --db "
        "exists (continue or resume it), else ../shared/datasets/imagenet-val-1300, else a fetched Imagenette "
        "sample in data/",
    )
    r.add_argument(
        "--models",
        help="comma-separated zoo names; they define the workspace's models (default: those of the workspace's "
        f"last run, else {_DEFAULT_MODELS})",
    )
    r.add_argument("--db", default=str(default_db()), help=db_help)
    r.add_argument("--labels", help="CSV 'path,label' for a flat folder (label: wnid, index or class name)")
    r.add_argument("--real", help="ReaL label JSON (default: the copy inside the timm wheel, when it applies)")
    r.add_argument(
        "--label-space",
        choices=["auto", "imagenet", "custom"],
        help="imagenet: every label must name an ImageNet class; custom: the labels are classes of their own "
        "(a flowers set's 'daisy'); auto (default): wnid folders, or a label file whose every label names an "
        "ImageNet class, are ImageNet's, anything else custom",
    )
    r.add_argument(
        "--classes",
        help="text file, one class per line: the class order of a custom label space (classes without images "
        "allowed; every label must be listed)",
    )
    r.add_argument(
        "--heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit cross-validated softmax and sigmoid heads on each model's features and add them as models "
        "(default: on for a custom label space, off for ImageNet's)",
    )
    r.add_argument(
        "--folds",
        type=_typed(_options.check_int, "--folds", lo=2),
        help="outer cross-validation folds of the heads (default 10)",
    )
    r.add_argument(
        "--truth",
        help="CSV 'path,label' of trusted labels for every image (a re-annotation, a clean set): every model is "
        "evaluated against it (evaluation 'truth') and the flags scored by it ('flags_vs_truth': precision, "
        "recall, AP)",
    )
    r.add_argument(
        "--reference",
        metavar="TRAIN_DIR",
        help="a training set (class folders, or any folder of images) the set should not duplicate: the duplicate "
        "checks also find images identical or nearly identical to one of its images (leakage); its labels are "
        "never scored",
    )
    r.add_argument("--batch-size", type=_typed(_options.check_int, "--batch-size", lo=1), default=64)
    r.add_argument(
        "--workers",
        type=_typed(_options.check_workers, "--workers"),
        default=min(2, os.cpu_count() or 1),
        help="DataLoader workers (0: load in this process)",
    )
    r.add_argument(
        "--limit",
        type=_typed(_options.check_int, "--limit", lo=1),
        help="score only this many images, evenly spaced over the sorted ids",
    )
    r.add_argument(
        "--device",
        type=_typed(_options.check_device, "--device"),
        help="torch device: cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)",
    )
    r.add_argument(
        "--backend",
        choices=["auto", "openvino", "onnxruntime", "torch"],
        default="auto",
        help="inference engine (auto: OpenVINO on CPU, PyTorch on CUDA; see reports/PERF.md)",
    )
    r.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="fp32 (default) or an opt-in reduced precision; its agreement is measured by python -m audit.bench",
    )
    r.add_argument(
        "--crop",
        choices=list(CROP_MODES),
        help="weights: each model's own resize + centre crop; full: the short side resized straight to the "
        "input edge (a square image kept whole); auto (default): full for a model whose input is larger than "
        "the images (e.g. 32 px CIFAR), weights otherwise",
    )
    r.add_argument(
        "--no-features",
        dest="features",
        action="store_false",
        help="do not record each model's penultimate features beside its logits (on by default; ~no extra time)",
    )
    r.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where the images are decoded and the models run: local (this machine, default) or ray (a Ray "
        "cluster: decode tasks and one actor pool per model; same results and shards; needs pip install -e "
        "'.[ray]'; see README 'Running on a cluster')",
    )
    r.add_argument(
        "--ray-address",
        help="--engine ray: the cluster, auto (the one 'ray start' runs on this machine), HOST:PORT (its head) or "
        "ray://HOST:10001 (default: a Ray started on this machine for the run)",
    )
    r.add_argument(
        "--ray-actors",
        type=_typed(_options.check_int, "--ray-actors", lo=1),
        help="--engine ray: actors per model (default: 1 on CPUs; on GPUs, the cluster's GPUs shared evenly)",
    )
    r.add_argument(
        "--ray-cpus-per-actor",
        type=_typed(_options.check_positive, "--ray-cpus-per-actor"),
        help="--engine ray: CPUs each model actor holds (default: 1 with GPUs; on CPUs, what one decode task "
        "leaves, shared evenly, at most 1)",
    )
    r.add_argument(
        "--ray-gpus-per-actor",
        type=_typed(_options.check_positive, "--ray-gpus-per-actor"),
        help="--engine ray: GPUs each model actor holds (default 1 where the cluster has GPUs; 0.5 or 0.25 put 2 "
        "or 4 actors on one GPU)",
    )
    r.add_argument(
        "--map",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store a 2-D map of the images from one model's features for the dashboard's Map page (default on; "
        "needs features and at least 100 images; recomputed only when the features change)",
    )
    r.add_argument(
        "--map-model",
        help="the model whose features make the map (default: the one whose predictions agree most with the labels)",
    )
    r.add_argument("--map-method", choices=["umap", "tsne"], default="umap", help="umap (default) or t-SNE")
    r.add_argument(
        "--sigmoid-threshold",
        type=_typed(_options.check_probability, "--sigmoid-threshold"),
        help="fixed threshold for the sigmoid evaluation (default: chosen by 2-fold cross-fitting)",
    )
    r.add_argument(
        "--checks",
        help="comma-separated checks to run, names or fnmatch patterns (see 'audit checks'; default: those of the "
        "workspace's last run, else every check that is on by default); a check whose inputs the run lacks is "
        "skipped with a note",
    )
    r.add_argument(
        "--check-option",
        action="append",
        metavar="NAME.OPTION=VALUE",
        help="an option of a selected check, e.g. label.weights=fit (repeatable; see each check's options)",
    )
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    mp = sub.add_parser(
        "map", help="compute the dashboard's map of a workspace from its stored features (no rescoring)"
    )
    mp.add_argument("--db", default=str(default_db()), help="workspace")
    mp.add_argument("--model", help="the model whose features make the map (default: the best-fitting one)")
    mp.add_argument("--method", choices=["umap", "tsne"], default="umap")
    mp.add_argument("--seed", type=_typed(_options.check_int, "--seed", lo=0), default=0)
    mp.set_defaults(func=cmd_map)
    k = sub.add_parser("checks", help="list the checks: name, the inputs each needs, default on/off, description")
    k.add_argument("filter", nargs="?", default="*", help="fnmatch filter, e.g. '*duplicate'")
    k.add_argument("--format", choices=["table", "csv", "json"], default="table")
    k.set_defaults(func=cmd_checks)

    m = sub.add_parser("models", help="list the zoo and whether weights are on this machine")
    m.add_argument("filter", nargs="?", default="*", help="fnmatch filter, e.g. 'resnet*'")
    m.add_argument("--available", action="store_true", help="only models whose weights are here")
    m.add_argument("--format", choices=["table", "csv", "json"], default="table")
    m.set_defaults(func=cmd_models)

    for name, func, hlp in (
        ("metrics", cmd_metrics, "accuracy per model and evaluation, with 95% intervals"),
        ("issues", cmd_issues, "images a check flagged (default: the label check), worst first"),
        (
            "runs",
            cmd_runs,
            "every audit run on the workspace: status (running / finished / interrupted / failed), times, models",
        ),
    ):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--db", default=str(default_db()), help=db_help)
        s.add_argument("--format", choices=["table", "csv", "json"], default="table")
        if name == "issues":
            s.add_argument("--limit", type=_typed(_options.check_int, "--limit", lo=1), help="show at most this many")
            s.add_argument(
                "--check", default="label", help="the check whose issues to list (default label; see 'audit checks')"
            )
        s.set_defaults(func=func)

    h = sub.add_parser(
        "heads",
        help="softmax vs sigmoid heads trained on the given vs the cleaned labels, evaluated out of fold against "
        "the given labels and the truth (--truth, or ReaL), per model with features",
    )
    h.add_argument("--db", default=str(default_db()), help=db_help)
    h.add_argument("--format", choices=["table", "csv", "json"], default="table")
    h.add_argument("--folds", type=_typed(_options.check_int, "--folds", lo=2), default=10, help="outer folds")
    h.add_argument("--seed", type=_typed(_options.check_int, "--seed", lo=0), default=0, help="fold assignment seed")
    h.set_defaults(func=cmd_heads)

    e = sub.add_parser("export", help="write the cleaned label set")
    e.add_argument("--db", default=str(default_db()), help=db_help)
    e.add_argument("--out", required=True, help="output folder, outside the dataset and its label files")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("review", help="record one review decision from the command line")
    v.add_argument("image", type=_typed(_options.check_int, "image", lo=0), help="image index (see 'audit issues')")
    v.add_argument("action", choices=list(ACTIONS), help="; ".join(f"{k}: {v}" for k, v in ACTIONS.items()))
    v.add_argument("--labels", help="comma-separated classes (wnid, index or name)")
    v.add_argument(
        "--of",
        type=_typed(_options.check_int, "--of", lo=0),
        help="with duplicate: the image index it is a copy of (the export's reason: 'duplicate of <its id>')",
    )
    v.add_argument("--reviewer")
    v.add_argument("--reason")
    v.add_argument("--db", default=str(default_db()), help=db_help)
    v.set_defaults(func=cmd_review)

    u = sub.add_parser(
        "duplicates",
        help="list the duplicate groups (exact_duplicate, near_duplicate; with --reference, copies of its images), "
        "different labels first; or resolve one group in one step",
    )
    u.add_argument(
        "group",
        nargs="?",
        type=_typed(_options.check_int, "group", lo=0),
        help="a group: any of its image indices (its id is the lowest); alone, lists that group's images",
    )
    u.add_argument(
        "resolution",
        nargs="?",
        choices=list(RESOLUTIONS),
        help="; ".join(f"{k}: {v}" for k, v in RESOLUTIONS.items()),
    )
    u.add_argument("--keep", type=_typed(_options.check_int, "--keep", lo=0), help="exclude_copies: the image to keep")
    u.add_argument("--label", help="one_label: the class (wnid, index or name)")
    u.add_argument("--show", choices=list(SHOWS), default="all", help="which groups to list (default all)")
    u.add_argument("--limit", type=_typed(_options.check_int, "--limit", lo=1), help="list at most this many groups")
    u.add_argument("--reviewer")
    u.add_argument("--reason")
    u.add_argument("--db", default=str(default_db()), help=db_help)
    u.add_argument("--format", choices=["table", "csv", "json"], default="table")
    u.set_defaults(func=cmd_duplicates)

    d = sub.add_parser("dashboard", help="open the review dashboard (Streamlit)")
    d.add_argument("--db", default=str(default_db()), help=db_help)
    d.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default localhost only; any other address warns, and decisions then need the access "
        "token: AUDIT_DASHBOARD_TOKEN, or a random one printed on stderr)",
    )
    d.add_argument("--port", type=_typed(_options.check_int, "--port", lo=1, hi=65535), default=8501)
    d.set_defaults(func=cmd_dashboard)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or --help): the code, not an exception
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="audit: %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"audit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("audit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        # A write the machine refused (full disk, read-only file system, permissions) wherever it
        # happened: one line and exit 2, like every other thing the user fixes.
        if not is_disk_error(e):
            raise
        print(f"audit: error: {disk_error(e, f'audit {args.command}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
