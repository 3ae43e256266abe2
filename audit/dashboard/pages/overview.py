"""The Overview page: the run's facts, the metrics under every evaluation, the checks that ran."""

from __future__ import annotations

import altair as alt
import streamlit as st

from audit import queries as q
from audit.dashboard.runtime import (
    EVAL_NAMES,
    goto,
    load,
    pct,
    ran_checks,
    reset_page,
)
from audit.dashboard.ui import alert, plain_frame, shown

__all__ = ["page_overview"]


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
