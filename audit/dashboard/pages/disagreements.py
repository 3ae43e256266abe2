"""The Disagreements page: the filtered gallery of cards, and the class pairs models confuse."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from audit import queries as q
from audit.dashboard.runtime import (
    PAGE_SIZE,
    class_label,
    class_labels,
    filters,
    gallery_cards,
    goto,
    load,
    other_checks,
    ran_checks,
    reset_page,
)
from audit.dashboard.ui import plain_frame, shown

__all__ = ["kind_name", "page_disagreements"]


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
    gallery_cards(rows, key="g_strip", extra=other_checks())


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
