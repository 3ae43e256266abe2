"""The Duplicates page: duplicate groups side by side, each resolved in one step through the decision log."""

from __future__ import annotations

from typing import Any

import streamlit as st

from audit import duplicates_view as dv
from audit.dashboard.pages.review import act
from audit.dashboard.runtime import (
    class_labels,
    goto,
    load,
    refresh,
    show_image,
    who_and_why,
    workspace,
    write_refusal,
)
from audit.dashboard.ui import shown
from audit.errors import StoreError, UserError

__all__ = ["page_duplicates"]

DUP_GROUPS = 8  # duplicate groups per page

DUP_SHOWN = 6  # images of one group shown side by side (with its reference images); the rest are counted


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
            workspace(),
            group,
            how,
            keep=None if how != "exclude_copies" or keep is None or keep < 0 else int(keep),
            label=None if how != "one_label" or label is None else int(label),
            **who_and_why(),
        )
    except (StoreError, UserError) as e:
        ss["_flash"] = ("error", "Group not resolved.", str(e))
        return
    refresh()  # the next rerun reads the decision back
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
            "labels differ" if g["labels_differ"] else ("given labels differed" if g["given_differ"] else "one label")
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
