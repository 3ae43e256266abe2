"""The Impact and Export pages: what the review changed, and the cleaned label files to download."""

from __future__ import annotations

import io
import shlex
import zipfile
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from audit import queries as q
from audit.dashboard.runtime import (
    load,
    pct,
    recent_decisions_view,
    workspace,
)
from audit.dashboard.ui import plain_frame, shown

__all__ = ["page_export", "page_impact"]


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
    recent_decisions_view("Latest decisions", 50, "No decision yet: review flagged images on the Review page.")


def page_export() -> None:
    st.header("Export the cleaned labels")
    s = load("export_summary")
    k = st.columns(4)
    k[0].metric("images", f"{s['images']:,}")
    k[1].metric("changed by review", f"{s['changed']:,}")
    k[2].metric("excluded", f"{s['excluded']:,}", help="no class fits, a duplicate, or a bad image")
    k[3].metric("bad images", f"{s['bad_images']:,}")
    db = workspace()
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
    recent_decisions_view(
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
