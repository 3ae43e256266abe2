"""Streamlit entry for the audit dashboard: a thin view over :mod:`audit.queries`.

Run with ``audit dashboard --db WORKSPACE`` (binds to localhost), or
``AUDIT_DB=path streamlit run app.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from audit.errors import UserError
from audit.pipeline import live_metrics
from audit.queries import flagged_issues, run_summary
from audit.store import default_db

st.set_page_config(page_title="audit", layout="wide")


def _db() -> Path:
    return Path(os.environ.get("AUDIT_DB") or st.query_params.get("db") or default_db())


def main() -> None:
    db = _db()
    st.title("audit — label quality")
    try:
        summary = run_summary(db)
        metrics = live_metrics(db)
        issues = flagged_issues(db, limit=200)
    except UserError as e:
        st.error(str(e))
        return
    cols = st.columns(5)
    cols[0].metric("images", summary["images"])
    cols[1].metric("classes present", summary["classes_present"])
    cols[2].metric("models", len(summary["models"]))  # type: ignore[arg-type]
    cols[3].metric("bad images", summary["bad_images"])
    cols[4].metric("flagged", summary["flagged"])
    st.caption(f"dataset {summary['dataset_root']} · workspace {db}")
    st.subheader("Accuracy per model and evaluation (95% intervals)")
    view = metrics.drop(columns=["params"]).copy()
    st.dataframe(view, hide_index=True, use_container_width=True)
    st.subheader("Flagged images, worst first")
    st.dataframe(issues, hide_index=True, use_container_width=True)


main()
