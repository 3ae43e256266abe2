"""Streamlit entry for the audit review dashboard: page layout and widgets only.

Every query and every decision goes through :mod:`audit.queries`; this file
only lays the sidebar out and draws the chosen page: each page is a module of
:mod:`audit.dashboard.pages`, and what they share (cached reads, thumbnails,
session state, write rights) is :mod:`audit.dashboard.runtime`. Run it with ``audit dashboard --db WORKSPACE`` (binds to
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

Caching and a busy workspace: see :mod:`audit.dashboard.runtime`.
"""

from __future__ import annotations

import streamlit as st

from audit.dashboard.pages.disagreements import page_disagreements
from audit.dashboard.pages.duplicates import page_duplicates
from audit.dashboard.pages.impact import page_export, page_impact
from audit.dashboard.pages.mappage import page_map
from audit.dashboard.pages.overview import page_overview
from audit.dashboard.pages.review import page_review
from audit.dashboard.runtime import (
    PAGES,
    check_token,
    init_state,
    page_reader,
    refresh,
    show_flash,
    workspace,
    write_policy,
)
from audit.dashboard.ui import alert, shown
from audit.errors import StoreError, UserError

st.set_page_config(page_title="audit", layout="wide")


# --------------------------------------------------------------------------- main


def main() -> None:
    init_state()
    db = workspace()
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
        st.button("Refresh data", on_click=refresh)
    page = ss["page"]
    show_flash()
    try:
        with page_reader():
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
