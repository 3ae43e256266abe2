"""What every dashboard page shares: the workspace, cached reads, thumbnails, session state and write rights.

Streamlit re-executes ``app.py`` on every rerun, but imports this module once per process: its globals are
shared by every session, so nothing here keeps per-session or per-run state in a global (the page render's
connection is thread-local: each script run has its own thread).

Caching: query results are cached per (query, arguments, data version), where the data version is a stat of
the DuckDB file and its WAL, so a decision written here or by another reviewer, or a finished ``audit run``,
shows on the next rerun. When another process holds the write lock longer than :func:`read_wait` seconds
(``audit run`` writing its results), a page shows the last data it had, says so, and catches up on the next
rerun.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from streamlit import config as st_config

from audit import duplicates_view as dv
from audit import mapview
from audit import queries as q
from audit.dashboard import auth, strip
from audit.dashboard.params import image_from_url, page_from_url
from audit.dashboard.thumbs import UnsafePath, safe_image_path, thumb_dir, thumbnail
from audit.dashboard.ui import alert, plain_frame, shown
from audit.errors import StoreError
from audit.store import default_db

__all__ = [
    "EVAL_NAMES",
    "LARGE",
    "PAGES",
    "PAGE_SIZE",
    "THUMB",
    "card_lines",
    "check_token",
    "class_label",
    "class_labels",
    "filters",
    "gallery_cards",
    "goto",
    "init_state",
    "load",
    "other_checks",
    "page_reader",
    "pct",
    "ran_checks",
    "read_wait",
    "recent_decisions_view",
    "refresh",
    "reset_page",
    "review_image",
    "selected_checks",
    "show_flash",
    "show_image",
    "thumb_bytes",
    "who_and_why",
    "workspace",
    "write_policy",
    "write_refusal",
]

PAGES = ("Overview", "Disagreements", "Map", "Review", "Duplicates", "Impact", "Export")

PAGE_SIZE = 24

THUMB = 192

LARGE = 512

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


def workspace() -> Path:
    return Path(os.environ.get("AUDIT_DB") or default_db())


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
    db = workspace()
    key = (name, str(db), args)
    lock, last = _last_good()
    try:
        page = getattr(_LOCAL, "reader", None)
        if page is not None:
            value = _cached(name, str(db), q.data_version(db), _args_key(args), args, page)
        else:
            with q.Reader(db, timeout=read_wait()) as reader:
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
    root = root or load("dataset_root")
    return _thumb(root or "", image_id, size, str(thumb_dir(workspace())), _stamp(root or "", image_id))


def show_image(image_id: str, size: int, root: str | None = None) -> None:
    """A thumbnail of a dataset image (or, with ``root``, of an image under that folder: the reference set)."""
    data, why = thumb_bytes(image_id, size, root)
    if data is None:
        alert("warning", "Image not shown", why)
    else:
        st.image(data, width=size)


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


def card_lines(row: Any, extra: bool = False) -> list[str]:
    """What a gallery card says about one image (a row of :func:`audit.queries.gallery`), line by line, as plain
    text: the one owner of a card's content, which the Disagreements gallery and the Map's selection both show.
    ``extra``: also which checks flagged it, each with its score and what it suggests."""
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
    if extra:
        lines.append(
            "flagged by: " + ("; ".join(shown(q.finding_line(x, short=True)) for x in row.findings) or "no check")
        )
    return lines


def review_image(image: int) -> None:
    """A card's button (the gallery's Review, the Review page's Open on a partner, neighbour or queue image): that
    image on the Review page, its queue the gallery's filters as they stand."""
    goto("Review", image)


def gallery_cards(rows: pd.DataFrame, *, key: str, extra: bool = False) -> None:
    """Gallery cards for ``rows`` (of :func:`audit.queries.gallery`), four to a row, as one strip
    (:mod:`audit.dashboard.strip`): each its thumbnail, :func:`card_lines` and a Review button. One element, not
    ~100 (a bordered container, image, text and button per card), so a page of cards draws in one go."""
    cards = []
    for row in rows.itertuples(index=False):
        data, why = thumb_bytes(row.image_id, THUMB)
        cards.append(strip.card(int(row.image_index), card_lines(row, extra), button="Review", thumb=data, why=why))
    strip.draw(cards, key=key, columns=4, size=THUMB, on_open=review_image, boxed=True)


def show_flash() -> None:
    """The message a callback left for this rerun (a decision saved or refused, a token checked)."""
    flash = st.session_state.pop("_flash", None)
    if flash:
        alert(*flash)


def recent_decisions_view(title: str, limit: int, empty: str) -> None:
    st.subheader(title)
    rec = load("recent_decisions", limit)
    if rec.empty:
        st.caption(empty)
    else:
        st.dataframe(plain_frame(rec), hide_index=True, width="stretch")


def read_wait() -> float:
    """Seconds a page waits for another process's write before showing its last data (AUDIT_READ_WAIT)."""
    return float(os.environ.get("AUDIT_READ_WAIT", "3"))


# The connection of the page render in progress on this thread (app.main's with block), opened on its first cache
# miss. None outside that block: a load() then (a callback, a format_func AppTest calls after the run, a
# fragment's rerun) opens and closes its own, so no connection, and no hold on q.DB_LOCK, outlives the call that
# opened it (a Reader left open held DB_LOCK in a finished thread: the next run hung). Thread-local, so another
# session's thread, or a download thread, never shares it: a DuckDB connection is not used from two threads at once.
_LOCAL = threading.local()


@contextlib.contextmanager
def page_reader() -> Iterator[q.Reader]:
    """One read connection for every query of a page render (closed when the block ends)."""
    reader = q.Reader(workspace(), timeout=read_wait())
    before = getattr(_LOCAL, "reader", None)
    _LOCAL.reader = reader
    try:
        yield reader
    finally:
        _LOCAL.reader = before
        reader.close()


def refresh() -> None:
    """Forget every cached query result (the sidebar's "Refresh data")."""
    _cached.clear()
