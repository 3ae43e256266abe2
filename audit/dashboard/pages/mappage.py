"""The Map page: one model's features in 2-D, coloured by a fact; a selection becomes a gallery or a queue.

The points are drawn by :mod:`audit.dashboard.mapcanvas` (a 2-D canvas: no WebGL needed), the hover card by
:mod:`audit.dashboard.maphover`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from audit import mapview
from audit import queries as q
from audit.dashboard import mapcanvas, mapfig, maphover
from audit.dashboard.runtime import (
    filters,
    gallery_cards,
    load,
    other_checks,
    thumb_bytes,
)
from audit.dashboard.ui import shown
from audit.errors import StoreError

__all__ = ["page_map"]

HOVER_THUMB = 200  # px: the Map's hover card (maphover)
# Cards shown under the map for a selection: a preview (the gallery pages through all of them, one click away).
# Half a gallery page: the browser's drawing of the cards was most of a lasso's release (24 cards: ~1.4 s here).
SELECTION_CARDS = 12


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


KEPT = "_m_kept"  # (map, selection): the Map's last selection, kept while the reviewer is on other pages


def kept_selection(state: Any, current_map: tuple[str, str]) -> dict[str, Any] | None:
    """The selection to draw: the canvas's own while it is on the page (``state``: its widget state, None once
    Streamlit has dropped it, i.e. after a visit to another page), else the one kept from the last visit to the
    same map; remembered for the next visit."""
    ss = st.session_state
    try:
        sel = state["selection"]  # the element's state (a mapping Streamlit wraps), while it is on the page
    except (KeyError, TypeError):
        kept = ss.get(KEPT)
        sel = kept[1] if kept and tuple(kept[0]) == tuple(current_map) else None
    ss[KEPT] = (tuple(current_map), sel)
    return sel


def _map_changed() -> None:
    """Another map: the last one's selection is in its coordinates, so neither it nor the kept one applies."""
    st.session_state.pop(KEPT, None)
    st.session_state.pop("m_canvas", None)


@st.fragment
def map_hover(model: str, method: str) -> None:
    """The thumbnail card of the point under the pointer (audit.dashboard.maphover). A fragment: the point the
    pointer rests on reruns this alone, so the map's figure is neither rebuilt nor sent to the browser again."""
    try:
        pts = load("mapview:map_points", model, method)
        rested = maphover.hovered_index(st.session_state.get("m_hover"))
        card = maphover.hover_payload(pts, rested, lambda i: thumb_bytes(i, HOVER_THUMB)[0])
    except StoreError:  # the workspace busy or gone: no card this time (the page itself says why)
        card = maphover.hover_payload(pd.DataFrame(), None, lambda i: None)
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
        "Map (features of one model)",
        maps,
        format_func=lambda m: f"{shown(m[0])} · {m[1].upper()}",
        key="m_map",
        on_change=_map_changed,
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
        f" Drawn: {len(drawn):,} of them (flagged ones first, then outlined ones, then a fixed sample of the rest); "
        "a lasso or box selects every image inside it, drawn or not."
        if len(drawn) < len(pts)
        else ""
    )
    st.caption(
        f"{len(pts):,} images. Draw a lasso or a box (Lasso / Box above the map), or click a point, to see those "
        f"images; the wheel zooms, Pan drags. Rest the pointer on a point for its thumbnail and labels.{sampled}"
    )
    last = kept_selection(ss.get("m_canvas"), (model, method))
    # The legend counts every image of the map the filter keeps, not only the drawn ones (a sample beyond 15,000).
    matches = (
        int(np.isin(pts["image_index"].to_numpy(), np.asarray(hl, dtype=np.int64)).sum()) if hl is not None else None
    )
    state = mapcanvas.draw(
        mapcanvas.payload(drawn, ss["m_colour"], hl, selection=last, matches=matches),
        key="m_canvas",
        selection=last,
    )
    map_hover(model, method)
    sel = mapfig.selected_from_event(mapcanvas.selection_event(state), pts)
    if not sel:
        return
    bar = st.columns([2, 3, 3])
    bar[0].metric("selected images", f"{len(sel):,}")
    bar[1].button("Send these to the review queue", type="primary", on_click=take_selection, args=(sel, "Review"))
    bar[2].button("Show them in the gallery", on_click=take_selection, args=(sel, "Disagreements"))
    f = q.Filters(kinds=(), checks=(), reviewed="all", sort="image", images=tuple(sel))
    total, rows = load("gallery", f, 0, SELECTION_CARDS)
    if total > len(rows):
        st.caption(f"The first {len(rows)} of {total:,}; the gallery pages through all of them.")
    # The gallery's cards: the page keeps its selection across visits, so every rerun of the Map draws these.
    gallery_cards(rows, key="m_sel_strip", extra=other_checks())
