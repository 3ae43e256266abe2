"""The Review page: one image, its evidence and neighbours, and the decisions a reviewer records on it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd
import streamlit as st

from audit import queries as q
from audit.dashboard import strip
from audit.dashboard.pages.disagreements import kind_name
from audit.dashboard.runtime import (
    LARGE,
    class_label,
    class_labels,
    filters,
    goto,
    load,
    other_checks,
    refresh,
    review_image,
    show_image,
    thumb_bytes,
    who_and_why,
    workspace,
    write_refusal,
)
from audit.dashboard.ui import alert, plain_frame, shown
from audit.errors import StoreError, UserError
from audit.store import ACTIONS

__all__ = ["act", "page_review"]

PARTNERS = 6  # partner images (duplicates) shown on the review page
# Partner cards to a row: the strip sits in the page's right-hand column, where six to a row left each card ~75 px
# and wrapped "near_duplicate:" mid-word; four fit a 112-px thumbnail and the check's name.
PARTNER_COLUMNS = 4

NEIGHBOUR_COUNTS = (4, 8, 12, 16, 20)  # how many nearest images the review page can show (20 are stored)

NEIGHBOUR_COLUMNS = 8  # thumbnails per row of the neighbours section

# Above this many classes the class pickers offer the image's candidates (candidate_classes) unless the reviewer
# asks for all of them: a picker of 1,000 options costs the browser ~0.15 s to draw on every rerun, and both
# pickers are drawn after every decision (reports/DASHBOARD.md). A space this small is offered in full.
SHORTLIST_ABOVE = 50


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
            workspace(),
            image,
            action,
            labels=labels,
            **who_and_why(),
        )
    except (StoreError, UserError) as e:
        ss["_flash"] = ("error", "Decision not saved.", str(e))
        return
    refresh()  # the next rerun reads the decision back
    ss["_flash"] = ("success", f"Decision {did} saved: {action} on image #{image} ({ACTIONS[action]}).")
    ss["reason"] = ""
    for k in (f"relabel_to_{image}", f"multi_to_{image}"):
        ss.pop(k, None)
    if action != "undo" and ss.get("advance", True):
        ss["image"] = next_image


def review_act(action: str, image: int, next_image: int | None, labels: tuple[int, ...] = ()) -> None:
    """A Review-page button or shortcut: :func:`act`, but only on the image the page shows now.

    Until a rerun has drawn the next image, the last run's buttons stay on screen and take key presses, bound
    to the image just decided: A then K, typed fast, kept the accepted image instead of deciding the next one.
    """
    ss = st.session_state
    if ss.get("image") is not None and int(ss["image"]) != int(image):
        ss["_flash"] = (
            "warning",
            "Not saved: that key or button was for the image decided a moment ago.",
            f"image #{image} is decided; the page now shows image #{ss['image']}. Press again to decide it.",
        )
        return
    act(action, image, next_image, labels)


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
    # One strip, as the neighbours (audit.dashboard.strip): names reach the cards as text, never Markdown.
    cards = []
    for idx, (check, image_id) in list(partners.items())[:PARTNERS]:
        data, why = thumb_bytes(image_id, 112)
        lines = [f"{shown(check)}: {shown(image_id)}", f"#{idx}"]
        cards.append(strip.card(idx, lines, button="Open", thumb=data, why=why, mark=True))
    strip.draw(cards, key="partner_strip", columns=min(len(cards), PARTNER_COLUMNS), size=112, on_open=review_image)
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
    cards = []
    for r in nb["neighbours"].itertuples(index=False):
        label = shown(r.current) if r.current else q.NO_FIT
        sim = "–" if r.similarity is None or pd.isna(r.similarity) else f"{r.similarity:.3f}"
        mark = f" · {shown(r.duplicate)}" if r.duplicate else ""
        data, why = thumb_bytes(r.image_id, 112)
        lines = [label[:28], f"{sim}{mark} · #{r.image_index}"]
        cards.append(strip.card(int(r.image_index), lines, button="Open", thumb=data, why=why, mark=bool(r.duplicate)))
    strip.draw(cards, key="nbr_strip", columns=NEIGHBOUR_COLUMNS, size=112, on_open=review_image)


def candidate_classes(d: dict[str, Any], neighbour_labels: Sequence[Sequence[int]] = ()) -> list[int]:
    """The classes a reviewer most likely wants for one image, most likely first, each once.

    Parameters
    ----------
    d : the image's :func:`audit.queries.image_detail` row: its suggestion, each model's top 5, ReaL labels,
        given and current labels.
    neighbour_labels : the current label sets of its nearest images (``image_neighbours``), nearest first.

    Returns
    -------
    list of class indices: the suggestion, the models' top 5 (ensemble first), the neighbours' labels (most
    common first), the ReaL labels, the given label and the current labels. Never -1 (no class fits is a
    decision of its own).
    """
    out: list[int] = []

    def add(x: Any) -> None:
        if x is not None and not pd.isna(x) and int(x) >= 0 and int(x) not in out:
            out.append(int(x))

    add(d.get("suggested_label"))
    # image_detail lists the ensemble last; it is the best single guess after the suggestion.
    for _, top in reversed(d.get("predictions") or []):
        for cls, _name, _p in top:
            add(cls)
    # A neighbour's set is a list or array; None (or NaN from a frame) where it has none.
    counts = Counter(int(x) for labs in neighbour_labels for x in (labs if hasattr(labs, "__iter__") else ()))
    for cls, _ in counts.most_common():  # ties keep the nearer neighbour's label first
        add(cls)
    for x in d.get("real_labels") if d.get("real_labels") is not None else ():
        add(x)
    add(d.get("label"))
    for x in d.get("current_labels") if d.get("current_labels") is not None else ():
        add(x)
    return out


def class_options(image: int, d: dict[str, Any], n_classes: int) -> list[int]:
    """The options of both class pickers: every class, or above :data:`SHORTLIST_ABOVE` the image's candidates
    unless the reviewer switched on all of them (the ``all_classes`` toggle, drawn here)."""
    if n_classes <= SHORTLIST_ABOVE:
        return list(range(n_classes))
    if st.toggle(f"Pick from all {n_classes:,} classes", key="all_classes"):
        return list(range(n_classes))
    nb = load("image_neighbours", image, int(st.session_state.get("n_k") or q.NEIGHBOURS_K))
    cand = candidate_classes(d, nb["neighbours"]["current_labels"].tolist())
    st.caption(
        f"Offered: {len(cand)} likely classes (the suggestion, the models' top 5, the neighbours' and ReaL labels). "
        "Switch on the toggle above for any other."
    )
    return cand


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
        # The window of an image not in the queue is the queue's head (queue_window): its first image is now the
        # one under review, at position 0, so the same window serves without a second query (a Map selection of
        # 24,000 images made that query ~0.15 s).
        ss["image"] = int(window["image_index"].iloc[0])
        pos = 0
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
            on_click=review_act,
            args=(take[0], image, next_image, take[1]),
            disabled=sug is None and not d["is_label_issue"],
        )
        bar.button("Keep original", shortcut="K", key="do_keep", on_click=review_act, args=("keep", image, next_image))
        bar.button(
            "No class fits", shortcut="N", key="do_nofit", on_click=review_act, args=("no_fit", image, next_image)
        )
        bar.button(
            "Undo last",
            shortcut="U",
            key="do_undo",
            on_click=review_act,
            args=("undo", image, next_image),
            disabled=not d["reviewed"],  # the stack: nothing to undo once every decision is withdrawn
        )
        options = class_options(image, d, len(labels))
        with st.form("relabel_form", clear_on_submit=False, border=True):
            st.selectbox(
                "Relabel to one class (type a name or wnid)",
                options,
                index=None,
                key=f"relabel_to_{image}",
                format_func=labels.__getitem__,
                placeholder=f"search {len(options):,} classes…",
            )
            st.form_submit_button(
                "Relabel", shortcut="Ctrl+Enter", on_click=review_act, args=("relabel", image, next_image)
            )
        default = [int(x) for x in d["current_labels"]]
        for x in [sug, *(d["real_labels"] if d["real_labels"] is not None else [])]:
            if pd.notna(x) and int(x) not in default:
                default.append(int(x))
        default = [x for x in default if x in options]  # all are candidates; a stray one must not raise
        with st.form("multi_form", border=True):
            st.multiselect(
                "Several valid labels",
                options,
                default=default,
                key=f"multi_to_{image}",
                format_func=labels.__getitem__,
            )
            st.form_submit_button(
                "Save these labels", shortcut="Ctrl+M", on_click=review_act, args=("multi", image, next_image)
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
    cards = []
    for w in window.itertuples(index=False):
        data, why = thumb_bytes(w.image_id, 112)
        here = w.image_index == image
        pos_label = f"{w.pos + 1:,}"
        cards.append(
            strip.card(int(w.image_index), [shown(w.given)[:28]], button=pos_label, thumb=data, why=why, current=here)
        )
    # The window holds up to 7 images (queue_window's radius 3): the cards keep their width at the queue's ends.
    strip.draw(cards, key="q_strip", columns=7, size=112, on_open=review_image)
