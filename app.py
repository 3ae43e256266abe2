"""Streamlit entry for the audit review dashboard: page layout and widgets only.

Every query and every decision goes through :mod:`audit.queries`; this file
only lays pages out. Run it with ``audit dashboard --db WORKSPACE`` (binds to
127.0.0.1), or ``AUDIT_DB=path streamlit run app.py --server.address 127.0.0.1``.
The workspace comes from the environment only, never from the URL; the URL
carries the page and the image index under review (``?page=review&image=17``),
validated by :mod:`audit.dashboard.params`.

Untrusted text. Every string a user or a dataset controls (file, folder, class
and model names, image ids, reviewers, reasons, paths, error messages quoting
them) is shown as plain text through :mod:`audit.dashboard.ui`; Markdown
elements and widget labels carry fixed text only.

Writes. Decisions are the only writes. Served beyond localhost, the app asks for
the access token before the first one (:mod:`audit.dashboard.auth`); served
beyond localhost without a token it is read only.

Caching: query results are cached per (query, arguments, data version), where
the data version is a stat of the DuckDB file and its WAL, so a decision written
here or by another reviewer, or a finished ``audit run``, shows on the next
rerun. When another process holds the write lock longer than
:data:`READ_WAIT` seconds (``audit run`` writing its results), a page shows the
last data it had, says so, and catches up on the next rerun.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import io
import os
import pickle
import shlex
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st
from streamlit import config as st_config

from audit import duplicates_view as dv
from audit import mapview
from audit import queries as q
from audit.dashboard import auth, mapfig, maphover
from audit.dashboard.params import image_from_url, page_from_url
from audit.dashboard.thumbs import UnsafePath, safe_image_path, thumb_dir, thumbnail
from audit.dashboard.ui import alert, plain_frame, shown
from audit.errors import StoreError, UserError
from audit.store import ACTIONS, default_db

st.set_page_config(page_title="audit", layout="wide")

PAGES = ("Overview", "Disagreements", "Map", "Review", "Duplicates", "Impact", "Export")
PAGE_SIZE = 24
PARTNERS = 6  # partner images (duplicates) shown on the review page
NEIGHBOUR_COUNTS = (4, 8, 12, 16, 20)  # how many nearest images the review page can show (20 are stored)
NEIGHBOUR_COLUMNS = 8  # thumbnails per row of the neighbours section
DUP_GROUPS = 8  # duplicate groups per page
DUP_SHOWN = 6  # images of one group shown side by side (with its reference images); the rest are counted
THUMB = 192
LARGE = 512
HOVER_THUMB = 200  # px: the Map's hover card (maphover)
# Seconds a page waits for another process's write before showing its last data.
READ_WAIT = float(os.environ.get("AUDIT_READ_WAIT", "3"))
EVAL_NAMES = {
    "original": "original",
    "real": "ReaL",
    "sigmoid": "sigmoid",
    "clean": "clean",
    "relabeled": "relabeled",
    "truth": "truth",
    "flags_vs_truth": "flags vs truth",
}
DEFAULTS: dict[str, Any] = {
    "f_kinds": ["flagged"],
    "f_checks": ["label"],
    "f_issue": [],
    "f_model": None,
    "f_class": None,
    "f_pair": None,
    "f_quality": (0.0, 1.0),
    "f_reviewed": "unreviewed",
    "f_sort": "quality",
    "f_images": None,
    "g_page": 1,
    "c_model": q.ENSEMBLE,
    "d_view": "Gallery",
    "reason": "",
    "advance": True,
    "n_k": q.NEIGHBOURS_K,
    "m_colour": "given",
    "m_highlight": True,
    "u_show": "all",
    "u_page": 1,
}
# Read-side modules the pages query through load("module:function", ...); a bare name is audit.queries'.
_QUERIES = {"q": q, "mapview": mapview, "duplicates_view": dv}


def _db() -> Path:
    return Path(os.environ.get("AUDIT_DB") or default_db())


# The connection of the page render in progress (main()'s with block), opened on its first cache miss. Empty
# outside that block: a load() then (a callback, which runs with the previous run's module globals, or a
# format_func called after the run) opens and closes its own, so no connection, and no hold on q.DB_LOCK,
# outlives the call that opened it. (A Reader left open held DB_LOCK in a finished thread: the next run hung.)
# Another thread never shares it either: a DuckDB connection is not used from two threads at once.
_READER: list[tuple[q.Reader, threading.Thread]] = []


@contextlib.contextmanager
def _page_reader() -> Iterator[q.Reader]:
    entry = (q.Reader(_db(), timeout=READ_WAIT), threading.current_thread())
    _READER.append(entry)
    try:
        yield entry[0]
    finally:
        _READER.remove(entry)
        entry[0].close()


# --------------------------------------------------------------------------- data access


@st.cache_data(ttl=300, max_entries=256, show_spinner=False)
def _cached(name: str, db: str, version: tuple[int, ...], key: str, _args: tuple[Any, ...], _reader: q.Reader) -> Any:
    mod, _, fn = name.rpartition(":")
    return getattr(_QUERIES[mod or "q"], fn)(_reader, *_args)


def _args_key(args: tuple[Any, ...]) -> str:
    """The arguments' cache key: a digest of their pickle. Streamlit's own hasher walks a tuple element by element,
    ~0.45 s for the 31,000 images of a Map selection (Filters.images) on every query that takes the filters; the
    pickle and its digest take a few milliseconds. The arguments are plain values (filters, ids, names, numbers)
    whose pickles are equal exactly when they are."""
    return hashlib.blake2b(pickle.dumps(args, protocol=5), digest_size=16).hexdigest()


@st.cache_resource
def _last_good() -> tuple[threading.Lock, OrderedDict[Any, Any]]:
    return threading.Lock(), OrderedDict()


def load(name: str, *args: Any) -> Any:
    """``audit.queries.<name>(db, *args)``, cached; the last result when the workspace stays locked."""
    db = _db()
    key = (name, str(db), args)
    lock, last = _last_good()
    try:
        if _READER and _READER[-1][1] is threading.current_thread():
            value = _cached(name, str(db), q.data_version(db), _args_key(args), args, _READER[-1][0])
        else:
            with q.Reader(db, timeout=READ_WAIT) as reader:
                value = _cached(name, str(db), q.data_version(db), _args_key(args), args, reader)
    except StoreError as e:
        with lock:
            stale = last.get(key)
        if stale is None or "locked" not in str(e):
            raise
        st.session_state["_busy"] = True
        return stale
    with lock:
        last[key] = value
        last.move_to_end(key)
        while len(last) > 512:
            last.popitem(last=False)
    return value


def _stamp(root: str, image_id: str) -> str:
    """The file's mtime and size: part of the memory cache's key, so a replaced image shows anew."""
    try:
        st_ = safe_image_path(root, image_id).stat()
    except (UnsafePath, OSError):
        return ""
    return f"{st_.st_mtime_ns}:{st_.st_size}"


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumb(root: str, image_id: str, size: int, cache: str, stamp: str) -> tuple[bytes | None, str]:
    try:
        return thumbnail(root, image_id, size, cache=cache), ""
    except UnsafePath as e:
        return None, f"refused: {e}"
    except OSError as e:
        return None, f"cannot read image: {e}"


def thumb_bytes(image_id: str, size: int, root: str | None = None) -> tuple[bytes | None, str]:
    """JPEG bytes of a dataset image's thumbnail (or, with ``root``, of an image under that folder: the reference
    set), or None and why not."""
    root = root or load("run_summary")["dataset_root"]
    return _thumb(root or "", image_id, size, str(thumb_dir(_db())), _stamp(root or "", image_id))


def show_image(image_id: str, size: int, root: str | None = None) -> None:
    """A thumbnail of a dataset image (or, with ``root``, of an image under that folder: the reference set)."""
    data, why = thumb_bytes(image_id, size, root)
    if data is None:
        alert("warning", "Image not shown", why)
    else:
        st.image(data, width=size)


# --------------------------------------------------------------------------- state


def init_state() -> None:
    ss = st.session_state
    if "_init" not in ss:
        ss["_init"] = True
        ss["page"] = page_from_url(st.query_params.get("page"), PAGES, "Overview")
        ss["image"] = image_from_url(st.query_params.get("image"))
        ss["reviewer"] = os.environ.get("AUDIT_REVIEWER") or getpass.getuser()
        for k, v in DEFAULTS.items():
            ss.setdefault(k, v)
    # Widgets drop their state when not drawn; re-assigning keeps filters alive across pages.
    for k in (*DEFAULTS, "reviewer"):
        if k in ss:
            ss[k] = ss[k]


def ran_checks() -> list[str]:
    """The checks of the newest run that ran (not skipped), the label check first."""
    runs = load("check_runs")
    return [c for c, ran in zip(runs["check"].tolist(), runs["ran"].tolist(), strict=True) if ran]


def other_checks() -> bool:
    """Whether a check besides ``label`` ran: only then do the check filter, the findings and the score sort show,
    so a workspace with the label check alone looks as it did before checks were plug-ins."""
    return any(c != "label" for c in ran_checks())


def selected_checks() -> tuple[str, ...]:
    """The checks the filter selects, among those that ran (empty: any check)."""
    ran = set(ran_checks())
    return tuple(c for c in st.session_state["f_checks"] if c in ran)


def filters() -> q.Filters:
    ss = st.session_state
    return q.Filters(
        kinds=tuple(ss["f_kinds"]),
        checks=selected_checks(),
        issue_kinds=tuple(ss["f_issue"]),
        model=ss["f_model"],
        class_index=ss["f_class"],
        pair=tuple(ss["f_pair"]) if ss["f_pair"] else None,
        quality=(float(ss["f_quality"][0]), float(ss["f_quality"][1])),
        reviewed=ss["f_reviewed"],
        sort=ss["f_sort"],
        images=tuple(ss["f_images"]) if ss["f_images"] is not None else None,
    )


def goto(page: str, image: int | None = None) -> None:
    st.session_state["page"] = page
    if image is not None:
        st.session_state["image"] = int(image)


def reset_page() -> None:
    st.session_state["g_page"] = 1


def pct(v: float | None) -> str:
    return "–" if v is None or pd.isna(v) else f"{100 * v:.1f}%"


def class_labels() -> list[str]:
    """'name · wnid · index' of every class ('name · index' where the key is the name), for the class pickers.

    Shown only as selectbox options and in plain text (never Markdown): names are data.
    """
    c = load("classes")
    return [
        f"{shown(n)} · {i}" if k == n else f"{shown(n)} · {shown(k)} · {i}"
        for i, k, n in zip(c["class_index"].tolist(), c["key"].tolist(), c["name"].tolist(), strict=True)
    ]


def class_label(labels: list[str], i: int | None) -> str:
    if i is None:
        return "any class"
    return labels[int(i)] if 0 <= int(i) < len(labels) else str(i)


# --------------------------------------------------------------------------- pages


def _runs(n: int) -> None:
    with st.expander(f"Runs on this workspace ({n})"):
        st.dataframe(plain_frame(load("runs_table")), hide_index=True, width="stretch")


def checks_lines() -> None:
    """One line per check the newest run selected (issues found, or why it was skipped), where any but label was."""
    runs = load("check_runs")
    if not (runs["check"] != "label").any():
        return  # the label check alone: its count is the "flagged" figure above
    lines = []
    for r in runs.itertuples(index=False):
        if r.ran:
            of = "" if r.n_assessed is None else f" of {r.n_assessed:,} images assessed"
            lines.append(f"{shown(r.check)}: {r.n_issues if r.n_issues is not None else '?'} issue(s){of}")
        else:
            lines.append(f"{shown(r.check)}: {shown(r.note)}")
    st.text("checks of the last run:\n" + "\n".join(lines))
    ran = ran_checks()
    if ran:
        pick, go = st.columns([3, 2], vertical_alignment="bottom")
        pick.selectbox("Check", ran, format_func=shown, key="o_check")
        go.button("Review this check's issues", on_click=review_check)


def review_check() -> None:
    """Overview callback: the gallery and the review queue become one check's unreviewed issues, worst first."""
    ss = st.session_state
    check = ss.get("o_check")
    if check is None:
        return
    ss["f_checks"], ss["f_kinds"], ss["f_sort"], ss["f_reviewed"] = [check], ["flagged"], "score", "unreviewed"
    ss["f_issue"], ss["f_model"], ss["f_class"], ss["f_pair"], ss["f_quality"] = [], None, None, None, (0.0, 1.0)
    ss["_to_gallery"] = True
    reset_page()
    goto("Disagreements")


def page_overview() -> None:
    s = load("run_summary")
    m = plain_frame(load("metrics_table"))
    st.header("Overview")
    c = st.columns(6)
    c[0].metric("images", f"{s['images']:,}")
    c[1].metric("classes present", f"{s['classes_present']:,}", help=f"of {s['classes']:,} in the label space")
    c[2].metric("models", len(s["models"]))
    c[3].metric("bad images", s["bad_images"], help="could not be read; left out of every metric")
    c[4].metric("flagged", f"{s['flagged']:,}")
    c[5].metric("reviewed", f"{s['reviewed']:,}")
    if s.get("heads_warning"):
        alert("warning", "Heads too weak to trust", s["heads_warning"])
    last = s["last_run"]
    st.text(
        f"dataset {shown(s['dataset_root'])} ({shown(s['layout'])}, {shown(s['label_space'])})\n"
        f"ReaL: {shown(s['real_source'] or 'does not apply')} ({s['with_real']:,} images)\n"
        f"models: {', '.join(shown(x) for x in s['models'])}\n"
        + (
            f"last run {shown(last[0])} {shown(last[1])}, finished {last[3]:%Y-%m-%d %H:%M} UTC"
            if last and last[3]
            else "no run yet"
        )
    )
    checks_lines()
    if m.empty:
        st.info("No metrics yet: the run stored no evaluation.")
        _runs(s["runs"])
        return
    h = q.headline(m)
    st.subheader("Accuracy per model and evaluation (95% intervals)")
    h["cell"] = [f"{pct(v)} ({pct(lo)[:-1]}–{pct(hi)})" for v, lo, hi in zip(h.value, h.low, h.high, strict=True)]
    h["column"] = [f"{EVAL_NAMES[e]} {mt}" for e, mt in zip(h.evaluation, h.metric, strict=True)]
    cols = [f"{EVAL_NAMES[e]} {mt}" for e, mt in q.HEADLINE.items() if e in set(h.evaluation)]
    wide = h.pivot(index="model", columns="column", values="cell")[cols].fillna("–")
    st.dataframe(wide, width="stretch")
    n = h.groupby("evaluation")["n"].max()
    st.caption("images per evaluation: " + ", ".join(f"{EVAL_NAMES[e]} {int(v):,}" for e, v in n.items()))
    flags = q.flags_vs_truth(m)
    if flags:
        st.text(flags)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Accuracy by evaluation")
        base = alt.Chart(h).encode(
            x=alt.X("evaluation:N", sort=list(q.HEADLINE), title=None, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("model:N"),
            color=alt.Color("model:N", legend=alt.Legend(orient="bottom", columns=2)),
        )
        lo = max(0.0, float(h.low.min()) - 0.05)
        bars = base.mark_bar(clip=True).encode(
            y=alt.Y(
                "value:Q",
                title="accuracy (headline metric)",
                scale=alt.Scale(domain=[lo, 1.0]),
                axis=alt.Axis(format="%"),
            ),
            tooltip=["model", "evaluation", "metric", alt.Tooltip("value:Q", format=".1%"), "n"],
        )
        err = base.mark_rule(color="black").encode(y="low:Q", y2="high:Q")
        st.altair_chart((bars + err).properties(height=320), width="stretch")
    with right:
        st.subheader("Model ranking per evaluation")
        ranks = q.rank_table(m)
        if ranks.empty or len(ranks) < 2:
            st.info("Ranking needs at least two models.")
        else:
            long = ranks.reset_index().melt(id_vars="model", var_name="evaluation", value_name="rank")
            chart = (
                alt.Chart(long)
                .mark_line(point=True)
                .encode(
                    x=alt.X("evaluation:N", sort=list(q.HEADLINE), title=None, axis=alt.Axis(labelAngle=0)),
                    y=alt.Y(
                        "rank:O",
                        scale=alt.Scale(domain=list(range(1, len(ranks) + 1))),
                        title="rank (1 = best)",
                    ),
                    color=alt.Color("model:N", legend=alt.Legend(orient="bottom", columns=2)),
                    tooltip=["model", "evaluation", "rank"],
                )
                .properties(height=260)
            )
            st.altair_chart(chart, width="stretch")
            st.dataframe(ranks.rename(columns=EVAL_NAMES), width="stretch")
            for e in ("real", "relabeled", "clean"):
                if e in ranks and "original" in ranks:
                    moved = ranks.index[ranks[e] != ranks["original"]].tolist()
                    if moved:
                        st.text(
                            f"{EVAL_NAMES[e]} reorders the models: "
                            + ", ".join(f"{mm} {ranks.at[mm, 'original']}→{ranks.at[mm, e]}" for mm in moved)
                        )
                    else:
                        st.caption(f"{EVAL_NAMES[e]} keeps the original order.")
    with st.expander("All metrics"):
        view = m.drop(columns=["params"]).copy()
        for col in ("value", "low", "high"):
            view[col] = view[col].map(pct)
        st.dataframe(view, hide_index=True, width="stretch")
    _runs(s["runs"])


def kind_name(kind: str) -> str:
    """A disagreement kind's fixed text; "flagged" names the check filter where other checks ran."""
    if kind == "flagged" and other_checks():
        return "an issue of the checks selected"
    return q.DISAGREEMENTS[kind]


def checks_changed() -> None:
    """The check filter changed: back to page 1, and sorted by the selected checks' score unless sorted otherwise."""
    ss = st.session_state
    reset_page()
    if ss["f_sort"] == "quality" and any(c != "label" for c in ss["f_checks"]):
        ss["f_sort"] = "score"


def filter_bar(models: list[str], labels: list[str]) -> None:
    ss = st.session_state
    extra = other_checks()
    if extra:
        ran = ran_checks()
        ss["f_checks"] = [c for c in ss["f_checks"] if c in ran]  # a new run may have dropped one
        st.multiselect(
            "Checks whose issues to show (with 'an issue of the checks selected')",
            ran,
            format_func=shown,  # check names come from the workspace: options render as text
            key="f_checks",
            on_change=checks_changed,
            help="an image is kept when any selected check flagged it; empty = any check",
        )
    elif ss["f_sort"] == "score":
        ss["f_sort"] = "quality"
    a, b, c, d = st.columns([3, 2, 2, 3])
    a.multiselect(
        "Show images where",
        list(q.DISAGREEMENTS),
        format_func=kind_name,
        key="f_kinds",
        on_change=reset_page,
        help="any of the selected; empty = every image",
    )
    b.multiselect("Issue kind (cleanlab)", list(q.ISSUE_KINDS), key="f_issue", on_change=reset_page)
    c.selectbox(
        "Model",
        [None, *models],
        format_func=lambda x: "any model" if x is None else shown(x),
        key="f_model",
        on_change=reset_page,
    )
    d.selectbox(
        "Class (given, suggested or predicted)",
        [None, *range(len(labels))],
        format_func=lambda i: class_label(labels, i),
        key="f_class",
        on_change=reset_page,
    )
    e, f, g = st.columns([3, 2, 2])
    e.slider("Label quality", 0.0, 1.0, step=0.01, key="f_quality", on_change=reset_page)
    f.radio("Reviewed", ["unreviewed", "reviewed", "all"], key="f_reviewed", horizontal=True, on_change=reset_page)
    sorts = [k for k in q.SORTS if extra or k != "score"]
    g.selectbox("Sort", sorts, format_func=lambda k: q.SORTS[k][0], key="f_sort", on_change=reset_page)
    if ss["f_images"] is not None:
        st.info(f"Only the {len(ss['f_images']):,} images selected on the Map page.")
        st.button("Clear the map selection", on_click=lambda: (ss.__setitem__("f_images", None), reset_page()))
    if ss["f_pair"]:
        pa, pb = ss["f_pair"]
        st.info("Only the images of one class pair (given label and a model's top-1, either way):")
        st.text(f"{class_label(labels, pa)} ↔ {class_label(labels, pb)}")
        st.button("Clear class pair", on_click=lambda: (ss.__setitem__("f_pair", None), reset_page()))


def card(row: pd.Series, extra: bool = False) -> None:
    with st.container(border=True):
        show_image(row.image_id, THUMB)
        sugg = f" → {shown(row.suggested)} ({row.suggested_confidence:.0%})" if row.is_label_issue else ""
        bits = [shown(row.image_id), f"#{row.image_index}"]
        if pd.notna(row.label_quality):
            bits.append(f"quality {row.label_quality:.3f}")
        if row.issue_kind:
            bits.append(shown(row.issue_kind).replace("_", " "))
        if row.reviewed:
            bits.append(f"reviewed: {shown(row.current) or 'no class fits'}")
        lines = [f"given {shown(row.given)}{sugg}", " · ".join(bits)]
        if row.real is not None:
            lines.append(f"ReaL: {shown(row.real) or '(none fits)'}")
        lines += [f"{shown(m)}: " + ", ".join(f"{shown(n)} {p:.0%}" for _, n, p in top) for m, top in row.top3]
        if extra:  # which checks flagged it, each with its score and what it suggests
            lines.append(
                "flagged by: " + ("; ".join(shown(q.finding_line(x, short=True)) for x in row.findings) or "no check")
            )
        # One plain-text element per card: names are data, never Markdown (audit.dashboard.ui).
        st.text("\n".join(lines))
        st.button("Review", key=f"rev_{row.image_index}", on_click=goto, args=("Review", int(row.image_index)))


def page_disagreements() -> None:
    st.header("Disagreements")
    models = load("model_names")
    if st.session_state.pop("_to_gallery", False):
        st.session_state["d_view"] = "Gallery"
    st.radio("View", ["Gallery", "Confused classes"], key="d_view", horizontal=True, label_visibility="collapsed")
    if st.session_state["d_view"] == "Gallery":
        gallery_view(models)
    else:
        pairs_view(models)


def gallery_view(models: list[str]) -> None:
    filter_bar(models, class_labels())
    f = filters()
    ss = st.session_state
    # One query gives the page and the total; a page past the end comes back as the last page.
    total, rows = load("gallery", f, max(1, int(ss["g_page"])) - 1, PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    ss["g_page"] = min(max(1, int(ss["g_page"])), pages)
    top = st.columns([2, 2, 3])
    top[0].number_input(f"Page (of {pages:,})", 1, pages, key="g_page")
    top[1].metric("matching images", f"{total:,}")
    top[2].button("Review these in order", type="primary", on_click=goto, args=("Review",), disabled=total == 0)
    if rows.empty:
        st.info("No image matches these filters.")
    cols = st.columns(4)
    extra = other_checks()
    for k, row in enumerate(rows.itertuples(index=False)):
        with cols[k % 4]:
            card(row, extra)


def pairs_view(models: list[str]) -> None:
    st.caption("Pairs of classes a model mixes up (given label vs its top-1), over every image, both directions.")
    ss = st.session_state
    if ss["c_model"] not in models:
        ss["c_model"] = models[-1] if models else None
    st.selectbox("Model", models, key="c_model", format_func=shown)
    pairs = load("confused_pairs", ss["c_model"], 25) if ss["c_model"] else pd.DataFrame()
    if pairs.empty:
        st.info("No confusions: the model's top-1 agrees with every given label.")
        return
    pairs = plain_frame(pairs)
    pairs["pair"] = [f"{shown(a)} ↔ {shown(b)}" for a, b in zip(pairs["a_name"], pairs["b_name"], strict=True)]
    left, right = st.columns([2, 3])
    with left:
        st.dataframe(
            pairs[["a_name", "b_name", "a_to_b", "b_to_a", "total"]].rename(
                columns={
                    "a_name": "class a",
                    "b_name": "class b",
                    "a_to_b": "a labelled, b predicted",
                    "b_to_a": "b labelled, a predicted",
                }
            ),
            hide_index=True,
            width="stretch",
        )
    with right:
        long = pairs.head(15).melt(id_vars=["pair", "total"], value_vars=["a_to_b", "b_to_a"], var_name="direction")
        long["direction"] = long["direction"].map({"a_to_b": "left class labelled", "b_to_a": "right class labelled"})
        chart = (
            alt.Chart(long)
            .mark_bar()
            .encode(
                y=alt.Y("pair:N", sort="-x", title=None, axis=alt.Axis(labelLimit=320)),
                x=alt.X("sum(value):Q", title="images", axis=alt.Axis(tickMinStep=1)),
                color=alt.Color("direction:N", legend=alt.Legend(orient="bottom")),
                tooltip=["pair", "direction", "value"],
            )
            .properties(height=28 * min(15, len(pairs)) + 40)
        )
        st.altair_chart(chart, width="stretch")
    pick = st.selectbox("Class pair", range(len(pairs)), format_func=lambda i: pairs["pair"].iloc[i], key="c_pick")

    def show_pair() -> None:
        ss["f_pair"] = (int(pairs["a"].iloc[pick]), int(pairs["b"].iloc[pick]))
        ss["f_kinds"], ss["f_issue"], ss["f_class"], ss["f_reviewed"] = [], [], None, "all"
        ss["f_model"] = ss["c_model"] if ss["c_model"] != q.ENSEMBLE else None
        ss["_to_gallery"] = True
        reset_page()

    st.button("Show these images in the gallery", on_click=show_pair)


def take_selection(images: list[int], page: str) -> None:
    """The Map page's selection becomes the gallery's and the review queue's images (flagged or not), then ``page``."""
    ss = st.session_state
    ss["f_images"] = [int(i) for i in images]
    ss["f_kinds"] = []
    ss["g_page"] = 1
    if page == "Review":
        ss["image"] = None  # the queue's first image
    else:
        ss["_to_gallery"] = True
    ss["page"] = page


@st.fragment
def map_hover(model: str, method: str) -> None:
    """The thumbnail card of the point under the pointer (audit.dashboard.maphover). A fragment: the point the
    pointer rests on reruns this alone, so the map's figure is neither rebuilt nor sent to the browser again."""
    try:
        pts = load("mapview:map_points", model, method)
        rested = maphover.hovered_index(st.session_state.get("m_hover"))
        card = maphover.hover_payload(pts, rested, lambda i: thumb_bytes(i, HOVER_THUMB)[0], chart_key="m_chart")
    except StoreError:  # the workspace busy or gone: no card this time (the page itself says why)
        card = maphover.hover_payload(pd.DataFrame(), None, lambda i: None, chart_key="m_chart")
    maphover.mount(card, key="m_hover")


def page_map() -> None:
    ss = st.session_state
    st.header("Map")
    info = load("mapview:map_maps")
    maps = [tuple(m) for m in info["maps"]]
    if not maps:
        st.text(shown(info["note"]))
        return
    if ss.get("m_map") not in maps:
        ss["m_map"] = maps[0]
    top = st.columns([3, 3, 2])
    top[0].selectbox(
        "Map (features of one model)", maps, format_func=lambda m: f"{shown(m[0])} · {m[1].upper()}", key="m_map"
    )
    top[1].selectbox("Colour by", list(mapview.COLOURS), format_func=mapview.COLOURS.get, key="m_colour")
    top[2].toggle(
        "Outline the gallery's filter",
        key="m_highlight",
        help="images the Disagreements filters keep (by default: flagged, unreviewed) drawn on top, outlined",
    )
    model, method = ss["m_map"]
    pts = load("mapview:map_points", model, method)
    if pts.empty:
        st.text("map: no image could be placed (no finite features)")
        return
    hl = load("mapview:selected_images", filters()) if ss["m_highlight"] else None
    drawn = mapfig.shown_points(pts, hl)
    sampled = (
        f" Drawn: {len(drawn):,} of them (every flagged and outlined one, a fixed sample of the rest); a lasso or "
        "box selects every image inside it, drawn or not."
        if len(drawn) < len(pts)
        else ""
    )
    st.caption(
        f"{len(pts):,} images. Draw a lasso or a box (toolbar, top right), or click a point, to see those images; "
        f"rest the pointer on a point for its thumbnail and labels.{sampled}"
    )
    event = st.plotly_chart(
        mapfig.map_figure(drawn, ss["m_colour"], hl),
        key="m_chart",
        on_select="rerun",
        selection_mode=("points", "box", "lasso"),
        width="stretch",
    )
    map_hover(model, method)
    sel = mapfig.selected_from_event(event, pts)
    if not sel:
        return
    bar = st.columns([2, 3, 3])
    bar[0].metric("selected images", f"{len(sel):,}")
    bar[1].button("Send these to the review queue", type="primary", on_click=take_selection, args=(sel, "Review"))
    bar[2].button("Show them in the gallery", on_click=take_selection, args=(sel, "Disagreements"))
    f = q.Filters(kinds=(), checks=(), reviewed="all", sort="image", images=tuple(sel))
    total, rows = load("gallery", f, 0, PAGE_SIZE)
    if total > len(rows):
        st.caption(f"The first {len(rows)} of {total:,}; the gallery pages through all of them.")
    cols = st.columns(4)
    extra = other_checks()
    for k, row in enumerate(rows.itertuples(index=False)):
        with cols[k % 4]:
            card(row, extra)


def write_policy() -> auth.WritePolicy:
    """Who may write here: from the bind address and the configured token (see :mod:`audit.dashboard.auth`)."""
    # streamlit.config.get_option, looked up at call time (AppTest patches it; st.get_option is bound early).
    address = st_config.get_option("server.address")
    if address is None and st_config.get_option("global.appTest"):
        address = "127.0.0.1"  # Streamlit's AppTest runs the script in-process: nothing listens anywhere
    return auth.write_policy(address, os.environ.get(auth.TOKEN_ENV))


def write_refusal() -> str | None:
    """Why this session may not write decisions now; None when it may."""
    policy = write_policy()
    if policy.mode == "open" or st.session_state.get("_authorized"):
        return None
    if policy.mode == "closed":
        return (
            "This dashboard is served beyond localhost without an access token, so it is read only. "
            "Start it with 'audit dashboard' (which sets a token), or bind it to 127.0.0.1."
        )
    return "Enter the access token in the sidebar first ('audit dashboard' printed it on its terminal)."


def check_token() -> None:
    """Sidebar callback: unlock writes for this browser session when the entered token matches."""
    ss = st.session_state
    entered = ss.get("_token_in") or ""
    ss["_token_in"] = ""  # never kept in session state past this check
    policy = write_policy()
    if policy.mode == "token" and auth.token_matches(entered, policy.token or ""):
        ss["_authorized"] = True
        ss["_flash"] = ("success", "Access token accepted: decisions are enabled for this browser session.")
    elif entered:
        ss["_flash"] = ("error", "Wrong access token: decisions stay disabled.")


def who_and_why() -> dict[str, str | None]:
    """The reviewer (None: the store's default) and the reason typed on the page, as every write passes them."""
    ss = st.session_state
    return {"reviewer": (ss.get("reviewer") or "").strip() or None, "reason": (ss.get("reason") or "").strip()}


def act(action: str, image: int, next_image: int | None, labels: tuple[int, ...] = ()) -> None:
    """Button callback: append a decision, then move on in the queue."""
    ss = st.session_state
    refused = write_refusal()
    if refused:
        ss["_flash"] = ("error", "Decision not saved.", refused)
        return
    if action == "relabel":
        choice = ss.get(f"relabel_to_{image}")
        if choice is None:
            ss["_flash"] = ("warning", "Pick a class to relabel to first.")
            return
        labels = (int(choice),)
    elif action == "multi":
        labels = tuple(int(x) for x in ss.get(f"multi_to_{image}") or ())
    try:
        did = q.record_decision(
            _db(),
            image,
            action,
            labels=labels,
            **who_and_why(),
        )
    except (StoreError, UserError) as e:
        ss["_flash"] = ("error", "Decision not saved.", str(e))
        return
    _cached.clear()
    ss["_flash"] = ("success", f"Decision {did} saved: {action} on image #{image} ({ACTIONS[action]}).")
    ss["reason"] = ""
    for k in (f"relabel_to_{image}", f"multi_to_{image}"):
        ss.pop(k, None)
    if action != "undo" and ss.get("advance", True):
        ss["image"] = next_image


def findings_view(findings: list[dict[str, Any]]) -> None:
    """What every check found on the image under review, and its partner images (duplicates) to open."""
    st.text(
        "checks:\n" + "\n".join(shown(q.finding_line(x)) for x in findings)
        if findings
        else "checks: no check of the last run assessed this image"
    )
    partners: dict[int, tuple[str, str]] = {}
    for x in findings:
        for idx, image_id in x["partners"]:
            partners.setdefault(int(idx), (x["check"], image_id))
    if not partners:
        return
    shown_partners = list(partners.items())[:PARTNERS]
    cols = st.columns(len(shown_partners))
    for col, (idx, (check, image_id)) in zip(cols, shown_partners, strict=True):
        with col:
            show_image(image_id, 112)
            st.text(f"{shown(check)}: {shown(image_id)} · #{idx}")
            # The names are the text above: button labels render Markdown.
            st.button("Open", key=f"open_{idx}", on_click=goto, args=("Review", idx))
    if len(partners) > PARTNERS:
        st.text(f"and {len(partners) - PARTNERS:,} more partner images")


def neighbours_view(image: int) -> None:
    """The image's nearest images in feature space: how they are labelled, and each one to open."""
    st.subheader("Nearest images in feature space")
    k = int(st.session_state.get("n_k") or q.NEIGHBOURS_K)
    nb = load("image_neighbours", image, k)
    if nb["note"]:
        st.text(shown(nb["note"]))
        return
    head = st.columns([5, 1])
    head[0].text(shown(nb["summary"]))
    head[1].selectbox("neighbours shown", NEIGHBOUR_COUNTS, key="n_k", label_visibility="collapsed")
    rows = list(nb["neighbours"].itertuples(index=False))
    for start in range(0, len(rows), NEIGHBOUR_COLUMNS):
        cols = st.columns(NEIGHBOUR_COLUMNS)
        for col, r in zip(cols, rows[start : start + NEIGHBOUR_COLUMNS], strict=False):
            with col:
                show_image(r.image_id, 112)
                label = shown(r.current) if r.current else "(no class fits)"
                sim = "–" if r.similarity is None or pd.isna(r.similarity) else f"{r.similarity:.3f}"
                mark = f" · {r.duplicate}" if r.duplicate else ""
                st.text(f"{label[:28]}\n{sim}{mark} · #{r.image_index}")
                # The names are the text above: button labels render Markdown.
                st.button("Open", key=f"nbr_{r.image_index}", on_click=goto, args=("Review", int(r.image_index)))


def left_out(action: str | None) -> str:
    """What an empty current label set means, from the decision in effect."""
    return "(excluded: a duplicate, see its history)" if action == "duplicate" else "(no class fits: left out)"


def page_review() -> None:
    ss = st.session_state
    st.header("Review")
    f = filters()
    total, pos, window = load("queue_window", f, ss["image"])
    if ss["image"] is None or load("image_detail", ss["image"]) is None:
        if window.empty:
            st.success(
                "Nothing left in this queue. Change the filters on the Disagreements page, or pick another image."
            )
            return
        ss["image"] = int(window["image_index"].iloc[0])
        total, pos, window = load("queue_window", f, ss["image"])
    image = int(ss["image"])
    d = load("image_detail", image)
    labels = class_labels()
    order = list(zip(window["pos"].tolist(), window["image_index"].tolist(), strict=True))
    after = [i for p, i in order if pos is not None and p > pos]
    before = [i for p, i in order if pos is not None and p < pos]
    next_image = after[0] if after else (before[-1] if before else None)
    prev_image = before[-1] if before else None
    where = f"{pos + 1:,} of {total:,}" if pos is not None else f"not in the queue ({total:,} images)"
    st.caption(
        f"Queue: {', '.join(kind_name(k) for k in f.kinds) or 'all images'} · {f.reviewed} · "
        f"sorted by {q.SORTS[f.sort][0]} — image {where}. Change it on the Disagreements page."
    )
    if other_checks():
        st.text(f"checks selected: {', '.join(shown(c) for c in f.checks) or 'any check'}")
    if write_refusal():
        st.info("Decisions are disabled in this session: see the sidebar.")
    nav = st.columns([1, 1, 4])
    nav[0].button(
        "◀ Previous", on_click=goto, args=("Review", prev_image), disabled=prev_image is None, shortcut="Left"
    )
    nav[1].button("Next ▶", on_click=goto, args=("Review", next_image), disabled=next_image is None, shortcut="Right")
    nav[2].toggle("Move to the next image after a decision", key="advance")
    left, right = st.columns([5, 6])
    with left:
        show_image(d["image_id"], LARGE)
        st.text(f"{shown(d['image_id'])} · image #{image}")
    with right:
        facts = [
            f"given label: {class_label(labels, d['label'])}",
            f"current labels: {shown(d['current']) or left_out(d['last_action'])} — "
            + ("reviewed" if d["reviewed"] else "not reviewed"),
        ]
        if d["real_labels"] is not None:
            facts.append(f"ReaL labels: {shown(d['real']) or '(none fits)'}")
        if pd.notna(d["label_quality"]):
            kind = shown(d["issue_kind"] or "not flagged").replace("_", " ")
            facts.append(
                f"cleanlab: label quality {d['label_quality']:.3f} · {kind} · suggested "
                f"{shown(d['suggested'])} ({d['suggested_confidence']:.0%})"
            )
        st.text("\n".join(facts))
        if d["bad_reason"]:
            alert("error", "Bad image: it could not be read, and is left out of every metric.", d["bad_reason"])
        if other_checks():
            findings_view(d["findings"])
        preds = pd.DataFrame(
            [
                {"model": m, **{f"top-{k + 1}": f"{n} {p:.0%}" for k, (_, n, p) in enumerate(top)}}
                for m, top in d["predictions"]
            ]
        )
        st.dataframe(plain_frame(preds), hide_index=True, width="stretch")
        for line in q.imagenet_sees(d):  # a custom space: what the zoo's ImageNet heads see, as context
            st.text(shown(line))
        st.text_input("Reason (optional; saved with the decision)", key="reason")
        bar = st.container(horizontal=True)
        sug = d["suggested_label"]  # a class index, or None: no class suggested (see audit.queries.gallery)
        # A no_fit flag suggests that no class fits: accepting it records exactly that.
        take = ("accept", (int(sug),)) if sug is not None else ("no_fit", ())
        bar.button(
            "Accept suggestion",  # its name is in the text above: button labels render Markdown
            type="primary",
            shortcut="A",
            key="do_accept",
            on_click=act,
            args=(take[0], image, next_image, take[1]),
            disabled=sug is None and not d["is_label_issue"],
        )
        bar.button("Keep original", shortcut="K", key="do_keep", on_click=act, args=("keep", image, next_image))
        bar.button("No class fits", shortcut="N", key="do_nofit", on_click=act, args=("no_fit", image, next_image))
        bar.button(
            "Undo last",
            shortcut="U",
            key="do_undo",
            on_click=act,
            args=("undo", image, next_image),
            disabled=not d["reviewed"],  # the stack: nothing to undo once every decision is withdrawn
        )
        options = list(range(len(labels)))
        with st.form("relabel_form", clear_on_submit=False, border=True):
            st.selectbox(
                "Relabel to one class (type a name or wnid)",
                options,
                index=None,
                key=f"relabel_to_{image}",
                format_func=labels.__getitem__,
                placeholder=f"search {len(labels):,} classes…",
            )
            st.form_submit_button("Relabel", shortcut="Ctrl+Enter", on_click=act, args=("relabel", image, next_image))
        default = [int(x) for x in d["current_labels"]]
        for x in [sug, *(d["real_labels"] if d["real_labels"] is not None else [])]:
            if pd.notna(x) and int(x) not in default:
                default.append(int(x))
        with st.form("multi_form", border=True):
            st.multiselect(
                "Several valid labels",
                options,
                default=default,
                key=f"multi_to_{image}",
                format_func=labels.__getitem__,
            )
            st.form_submit_button(
                "Save these labels", shortcut="Ctrl+M", on_click=act, args=("multi", image, next_image)
            )
        st.caption("Keys: A accept · K keep · N no class fits · U undo · ← → previous / next · Ctrl+Enter relabel")
    neighbours_view(image)
    st.subheader("History")
    hist = d["history"]
    if hist.empty:
        st.caption("No decision yet.")
    else:
        st.dataframe(
            plain_frame(hist[["decision_id", "decided_at", "reviewer", "action", "old", "new", "reason"]]),
            hide_index=True,
            width="stretch",
        )
    st.subheader("Queue")
    if window.empty:
        return
    cols = st.columns(len(window))
    for col, w in zip(cols, window.itertuples(index=False), strict=True):
        with col:
            show_image(w.image_id, 112)
            st.text(shown(w.given)[:28])
            st.button(
                f"{w.pos + 1:,}",  # the class name is the text above: button labels render Markdown
                key=f"q_{w.image_index}",
                on_click=goto,
                args=("Review", int(w.image_index)),
                disabled=w.image_index == image,
                type="primary" if w.image_index == image else "secondary",
            )


def resolve(group: int, how: str) -> None:
    """Duplicates callback: resolve one group in one step (one transaction), as the buttons of its card say."""
    ss = st.session_state
    refused = write_refusal()
    if refused:
        ss["_flash"] = ("error", "Group not resolved.", refused)
        return
    keep = ss.get(f"u_keep_{group}")
    label = ss.get(f"u_label_{group}")
    try:
        ids = dv.resolve_group(
            _db(),
            group,
            how,
            keep=None if how != "exclude_copies" or keep is None or keep < 0 else int(keep),
            label=None if how != "one_label" or label is None else int(label),
            **who_and_why(),
        )
    except (StoreError, UserError) as e:
        ss["_flash"] = ("error", "Group not resolved.", str(e))
        return
    _cached.clear()
    ss["reason"] = ""
    if ids:
        ss["_flash"] = (
            "success",
            f"Group {group} resolved ({dv.RESOLUTIONS[how]}): {len(ids)} decision(s) saved, "
            f"{ids[0]}–{ids[-1]}. Undo works per image, as on the Review page.",
        )
    else:
        ss["_flash"] = ("info", f"Group {group} already stands so: nothing to save.")


def _dup_member(m: dict[str, Any]) -> None:
    """One image of a duplicate group: thumbnail, labels, what found it, its state; open it, or undo its decision."""
    show_image(m["image_id"], 160)
    found = []
    for c in m["checks"]:
        if c == "near_duplicate":
            bits = [f"similarity {m['similarity']:.3f}" if m["similarity"] is not None else None]
            bits.append(f"phash {m['hash_distance']} bits" if m["hash_distance"] is not None else None)
            found.append("near" + (f" ({', '.join(b for b in bits if b)})" if any(bits) else ""))
        else:
            found.append("exact" if c == "exact_duplicate" else shown(c))
    if m["ref"]:
        found.append("copy of a reference image")
    st.text(
        f"{shown(m['image_id'])}\n#{m['image_index']} · given {shown(m['given']) or '(none)'}\n"
        f"now: {shown(m['current']) or '(left out)'}\n{shown(dv.member_status(m))}\n{' · '.join(found)}"
    )
    b = st.container(horizontal=True)
    b.button("Open", key=f"u_open_{m['image_index']}", on_click=goto, args=("Review", int(m["image_index"])))
    b.button(
        "Undo",
        key=f"u_undo_{m['image_index']}",
        on_click=act,
        args=("undo", int(m["image_index"]), None),
        disabled=not m["reviewed"],
        help="withdraw the decision in effect on this image (as Undo on the Review page)",
    )


def _dup_reference(e: dict[str, Any], root: str | None) -> None:
    """One reference-set image a group copies: its thumbnail (from the reference folder), path and label."""
    if root:
        show_image(e["id"], 160, root=root)
    label = e["label_name"] if e["label"] is not None else "(unlabelled, or not known)"
    st.text(f"reference set: {shown(e['id'])}\nlabel there: {shown(label)}\ncopied by #{', #'.join(map(str, e['of']))}")


def group_card(g: dict[str, Any], labels: list[str], root: str | None) -> None:
    """One duplicate group side by side, with the three ways to resolve it."""
    gid = g["group"]
    members = g["members"].to_dict("records")
    with st.container(border=True):
        state = "resolved" if g["resolved"] else f"{g['n_reviewed']} of {g['size']} reviewed"
        differ = (
            "labels differ"
            if g["labels_differ"]
            else ("given labels differed" if g["given_differ"] else "one label")
        )
        ref = f" · {g['n_ref']} reference image(s)" if g["n_ref"] else ""
        found = ", ".join(shown(c) for c in g["checks"])
        st.text(
            f"group {gid} · {g['size']} image(s){ref} · {differ} · {state} · "
            f"{g['n_kept']} in evaluation, {g['n_copies']} excluded as duplicates · found by {found}"
        )
        # The set's images first, then the reference images they copy (at least one of those, when there are any).
        mine = members[:DUP_SHOWN]
        refs = g["reference"][: max(1, DUP_SHOWN - len(mine))]
        cols = st.columns(max(len(mine) + len(refs), 4))  # at least 4: a pair's thumbnails keep their size
        for col, m in zip(cols, mine, strict=False):
            with col:
                _dup_member(m)
        for col, e in zip(cols[len(mine) :], refs, strict=False):
            with col:
                _dup_reference(e, root)
        hidden = g["more"] + len(members) - len(mine)
        hidden_refs = len(g["reference"]) - len(refs)
        more = [f"{hidden:,} more image(s) of the set"] * bool(hidden)
        more += [f"{hidden_refs:,} more of the reference set"] * bool(hidden_refs)
        if more:
            st.text(f"and {', '.join(more)} ('audit duplicates {gid} --db ...' lists them all)")
        keep_opts = [int(m["image_index"]) for m in members] + ([-1] if g["reference"] else [])
        ids = {int(m["image_index"]): m["image_id"] for m in members}

        def keep_name(i: int) -> str:
            return "none: every image copies the reference set" if i < 0 else f"#{i} {shown(ids[i])}"

        current = [int(x) for m in members for x in (m["current_labels"] or [])]
        common = max(set(current), key=current.count) if current else None
        # A resolved group keeps its controls folded away: its images and their state are what it shows.
        box = st.expander("Resolve this group again") if g["resolved"] else st.container()
        with box:
            a, b, c = st.columns([4, 4, 3], vertical_alignment="bottom")
            a.selectbox(
                "Image to keep (the others are excluded as its duplicates)",
                keep_opts,
                # A copy of a reference (training) image was seen in training: by default none of the set is kept.
                index=len(keep_opts) - 1 if g["reference"] else 0,
                key=f"u_keep_{gid}",
                format_func=keep_name,
            )
            a.button(
                "Exclude the copies",
                key=f"u_x_{gid}",
                on_click=resolve,
                args=(gid, "exclude_copies"),
                type="primary",
                help="the image chosen above stays; every other image of the group is left out of evaluation, "
                "recorded as its duplicate (or, with none kept, as a duplicate of the reference image)",
            )
            b.selectbox(
                "One label for the whole group",
                list(range(len(labels))),
                index=common if common is not None and 0 <= common < len(labels) else None,
                key=f"u_label_{gid}",
                format_func=labels.__getitem__,
                placeholder=f"search {len(labels):,} classes…",
            )
            b.button("Set this label for all", key=f"u_l_{gid}", on_click=resolve, args=(gid, "one_label"))
            c.button(
                "Keep all",
                key=f"u_k_{gid}",
                on_click=resolve,
                args=(gid, "keep_all"),
                help="not copies to remove: every image stays in evaluation with its current label; copies "
                "excluded earlier come back",
            )


def page_duplicates() -> None:
    ss = st.session_state
    st.header("Duplicates")
    res = load("duplicates_view:duplicate_groups", ss["u_show"], max(1, int(ss["u_page"])) - 1, DUP_GROUPS, DUP_SHOWN)
    if res["note"]:
        st.info("The duplicate checks have not run on this workspace, so there are no groups to show.")
        st.text(shown(res["note"]))
        return
    c = res["counts"]
    k = st.columns(5)
    k[0].metric("duplicate groups", f"{c['groups']:,}")
    k[1].metric("images in them", f"{c['images']:,}")
    k[2].metric("with different labels", f"{c['differ']:,}", help="the same picture under different labels")
    k[3].metric("copies of the reference set", f"{c['reference']:,}", help="groups with a reference-set image")
    k[4].metric("unresolved", f"{c['unresolved']:,}", help="groups with an image no decision is in effect on")
    for check, why in res["checks"].items():
        if why:
            st.text(f"{shown(check)}: {shown(why)}")
    if not c["groups"]:
        st.success("No duplicates: the duplicate checks found no two images alike, nor a copy of the reference set.")
        return
    st.caption(
        "Unresolved groups first, those whose labels differ at the top; a group is resolved when every image of it "
        "has a decision in effect. Each resolution is one step (all its decisions, or none) in the review log: it "
        "shows on the Impact and Export pages, and excluded copies are exported with the reason 'duplicate of …'."
    )
    pages = max(1, -(-res["total"] // DUP_GROUPS))
    ss["u_page"] = min(max(1, int(ss["u_page"])), pages)
    top = st.columns([3, 2, 3])
    top[0].selectbox("Show", list(dv.SHOWS), format_func=dv.SHOWS.__getitem__, key="u_show", on_change=_dup_page1)
    top[1].number_input(f"Page (of {pages:,})", 1, pages, key="u_page")
    top[2].text_input("Reason (optional; saved with each decision)", key="reason")
    if write_refusal():
        st.info("Decisions are disabled in this session: see the sidebar.")
    if not res["groups"]:
        st.info("No group matches this selection.")
    labels = class_labels()
    for g in res["groups"]:
        group_card(g, labels, res["reference_root"])


def _dup_page1() -> None:
    st.session_state["u_page"] = 1


def page_impact() -> None:
    st.header("Impact of the review")
    c = load("decision_counts")
    m = plain_frame(load("metrics_table"))
    k = st.columns(7)
    k[0].metric("decisions", f"{c['decisions']:,}")
    k[1].metric("images reviewed", f"{c['reviewed']:,}")
    k[2].metric("flags reviewed", f"{c['reviewed_flagged']:,} / {c['flagged']:,}")
    k[3].metric(
        "accepted",
        c["accepted"],
        help="flagged images given the suggested label (or no class, where no class fits was the suggestion)",
    )
    k[4].metric("rejected", c["rejected"], help="flagged images kept as given")
    k[5].metric(
        "flag precision",
        pct(c["precision"]),
        help="among reviewed flags, the share whose label set the reviewer changed (accepted, relabeled, "
        "several labels, no class fits) rather than kept",
    )
    k[6].metric(
        "copies excluded",
        f"{c['duplicates']:,}",
        help="copies left out of evaluation on the Duplicates page (not counted as reviewed flags: leaving a copy "
        "out says nothing about its label)",
    )
    if c["reviewed_flagged"]:
        st.caption(
            f"Flag precision so far {pct(c['precision'])} (95% interval {pct(c['precision_low'])}–"
            f"{pct(c['precision_high'])}) from {c['reviewed_flagged']:,} reviewed flags; "
            f"{c['other_change']} changed otherwise (relabel / several labels / no class fits)."
        )
    imp = q.impact(m)
    if imp.empty:
        st.info("No metrics yet.")
        return
    flags = q.flags_vs_truth(m)
    if flags:
        st.text(flags)
    view = pd.DataFrame({"model": imp["model"]})
    for col, title in (
        ("original", "original top-1"),
        ("relabeled", "relabeled top-1"),
        ("real", "ReaL top-1"),
        ("truth", "truth top-1"),
    ):
        if col in imp:
            view[title] = [
                f"{pct(v)} ({pct(lo)[:-1]}–{pct(hi)})"
                for v, lo, hi in zip(imp[col], imp[f"{col}_low"], imp[f"{col}_high"], strict=True)
            ]
    if "delta_vs_original" in imp:
        view["Δ vs original"] = [f"{100 * v:+.2f} pp" for v in imp["delta_vs_original"]]
    if "delta_vs_real" in imp:
        view["Δ vs ReaL"] = [f"{100 * v:+.2f} pp" for v in imp["delta_vs_real"]]
    if "rank_change" in imp:
        view["rank original → relabeled"] = [
            "–" if pd.isna(a) else f"{a} → {b}" + (f" ({int(ch):+d})" if ch else "")
            for a, b, ch in zip(imp["rank_original"], imp["rank_relabeled"], imp["rank_change"], strict=True)
        ]
    st.dataframe(view, hide_index=True, width="stretch")
    long = imp.melt(
        id_vars="model",
        value_vars=[e for e in ("original", "relabeled", "real") if e in imp],
        var_name="evaluation",
        value_name="top1",
    )
    chart = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("evaluation:N", sort=["original", "relabeled", "real"], title=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y("top1:Q", scale=alt.Scale(zero=False), axis=alt.Axis(format="%"), title="top-1 accuracy"),
            color="model:N",
            tooltip=["model", "evaluation", alt.Tooltip("top1:Q", format=".2%")],
        )
        .properties(height=300)
    )
    st.altair_chart(chart, width="stretch")
    _recent_decisions("Latest decisions", 50, "No decision yet: review flagged images on the Review page.")


def _recent_decisions(title: str, limit: int, empty: str) -> None:
    st.subheader(title)
    rec = load("recent_decisions", limit)
    if rec.empty:
        st.caption(empty)
    else:
        st.dataframe(plain_frame(rec), hide_index=True, width="stretch")


def page_export() -> None:
    st.header("Export the cleaned labels")
    s = load("export_summary")
    k = st.columns(4)
    k[0].metric("images", f"{s['images']:,}")
    k[1].metric("changed by review", f"{s['changed']:,}")
    k[2].metric("excluded", f"{s['excluded']:,}", help="no class fits, a duplicate, or a bad image")
    k[3].metric("bad images", f"{s['bad_images']:,}")
    db = _db()
    st.markdown(
        "The same files, made by the same code, as this command: "
        "`labels.csv` (image, label, labels, status, source), `classes.csv`, `excluded.csv` (for spreadsheets: "
        "a cell that could start a formula begins with `'`), `labels.jsonl` and `classes.jsonl` (lossless), "
        "`imagefolder.txt` and, for ILSVRC-2012 file names, `real.json`. They are built when you click."
    )
    st.code(shown(f"audit export --db {shlex.quote(str(db))} --out DIR"), language=None)
    version = q.data_version(db)

    def files() -> dict[str, bytes]:
        return _export(str(db), version)

    def zipped() -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in sorted(files().items()):
                info = zipfile.ZipInfo(f"cleaned/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, data, zipfile.ZIP_DEFLATED)
        return buf.getvalue()

    st.download_button(
        "Download all (zip)",
        zipped,
        file_name="cleaned-labels.zip",
        mime="application/zip",
        type="primary",
        key="dl_zip",
        on_click="ignore",
    )
    cols = st.columns(len(s["files"]))
    for col, name in zip(cols, s["files"], strict=True):
        col.download_button(
            name,
            lambda n=name: files()[n],
            file_name=name,
            key=f"dl_{name}",
            on_click="ignore",
            mime="application/json"
            if name.endswith((".json", ".jsonl"))
            else "text/csv"
            if name.endswith(".csv")
            else "text/plain",
        )
    _recent_decisions(
        "Latest decisions, newest first", 200, "No decision yet: the export equals the given labels (less bad images)."
    )


@st.cache_resource(max_entries=2)
def _export_store() -> dict[Any, dict[str, bytes]]:
    return {}


def _export(db: str, version: tuple[int, ...]) -> dict[str, bytes]:
    """Export bytes for one data version (built off the script thread when a download is clicked)."""
    store = _export_store()
    key = (db, version)
    if key not in store:
        store.clear()
        store[key] = q.export_files(Path(db))
    return store[key]


def show_flash() -> None:
    """The message a callback left for this rerun (a decision saved or refused, a token checked)."""
    flash = st.session_state.pop("_flash", None)
    if flash:
        alert(*flash)


# --------------------------------------------------------------------------- main


def main() -> None:
    init_state()
    db = _db()
    ss = st.session_state
    with st.sidebar:
        st.title("audit")
        st.radio("Page", PAGES, key="page")
        st.text_input("Reviewer", key="reviewer", help="saved with each decision")
        if write_policy().mode == "token":
            if ss.get("_authorized"):
                st.caption("Access token accepted: decisions enabled.")
            else:
                st.text_input(
                    "Access token (needed to record decisions)",
                    key="_token_in",
                    type="password",
                    on_change=check_token,
                    help="printed by 'audit dashboard' when it serves beyond localhost, or the value of "
                    "AUDIT_DASHBOARD_TOKEN",
                )
        st.caption("workspace")
        st.text(shown(db))
        st.button("Refresh data", on_click=_cached.clear)
    page = ss["page"]
    show_flash()
    try:
        with _page_reader():
            {
                "Overview": page_overview,
                "Disagreements": page_disagreements,
                "Map": page_map,
                "Review": page_review,
                "Duplicates": page_duplicates,
                "Impact": page_impact,
                "Export": page_export,
            }[page]()
    except StoreError as e:
        if "locked" in str(e):
            st.warning(
                "The workspace is busy: another process (an `audit run` finishing, an export, another reviewer) "
                "is writing it. Try again in a moment."
            )
        else:
            alert("warning", "The workspace cannot be read.", str(e))
        st.button("Try again")
    except UserError as e:
        alert("error", "This page cannot be shown.", str(e))
    if ss.pop("_busy", False):
        st.info("Another process is writing the workspace; showing the last data read. Refresh in a moment.")
    sync_url(page)


def sync_url(page: str) -> None:
    """The URL carries the page and the image under review, as validated here, and nothing else."""
    want = {"page": page.lower()}
    if page == "Review" and st.session_state.get("image") is not None:
        want["image"] = str(int(st.session_state["image"]))
    for k in [k for k in st.query_params if k not in want]:
        del st.query_params[k]
    for k, v in want.items():
        if st.query_params.get(k) != v:
            st.query_params[k] = v


main()
