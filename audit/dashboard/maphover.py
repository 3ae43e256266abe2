"""Hovering a point of the Map shows that image's thumbnail, beside the pointer.

The map (:mod:`audit.dashboard.mapcanvas`) sends ``audit-map-hover`` events (the image index under the pointer,
and where the pointer is) and ``audit-map-unhover`` to the page; this small Streamlit components-v2 element (not
iframed) listens to them:

* the pointer rests on a point for :data:`REST_MS`: the element sets its ``hovered`` state to that point's
  image index, which reruns the script once;
* the rerun (:func:`hover_payload`; the app mounts the element in a fragment, so only the fragment reruns)
  reads the thumbnail and the image's labels and hands them back as the element's data; the map's figure is
  neither rebuilt nor sent again;
* the element shows a card beside the pointer: the thumbnail, the image id and its labels. Moving off the point
  hides it at once, without a rerun.

Everything user-controlled (ids, class names) reaches the card through ``textContent``, never as markup; the
thumbnail is a ``data:`` URL of JPEG bytes this process made, so the browser requests nothing. The element
itself takes no room on the page (height 0): the card floats.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pandas as pd

from audit.dashboard.elements import element
from audit.dashboard.ui import shown

__all__ = ["REST_MS", "hover_payload", "hovered_index", "mount"]

REST_MS = 120  # ms the pointer rests on a point before its thumbnail is asked for: a sweep asks for nothing

_NAME = "audit_map_hover"

# Only the newest rerun's data is shown, and only while the pointer is still on that image.
_JS = r"""
export default function (component) {
  const { data, setStateValue, parentElement } = component;
  const root = parentElement;
  let st = root.__auditHover;
  if (!st) {
    st = root.__auditHover = { want: null, x: 0, y: 0, timer: null, shown: null };
    const card = document.createElement("div");
    card.className = "card";
    card.setAttribute("data-testid", "auditMapHover");
    const img = document.createElement("img");
    const txt = document.createElement("div");
    txt.className = "txt";
    card.append(img, txt);
    root.appendChild(card);
    st.card = card; st.img = img; st.txt = txt;
    st.onHover = (ev) => {
      const idx = ev.detail.idx;
      st.x = ev.detail.x; st.y = ev.detail.y;
      st.want = idx;
      clearTimeout(st.timer);
      if (st.shown === idx) { st.render(); return; }
      st.card.style.display = "none";
      st.timer = setTimeout(() => { if (st.want === idx) setStateValue("hovered", idx); }, st.rest);
    };
    st.onUnhover = () => { st.want = null; clearTimeout(st.timer); st.card.style.display = "none"; };
    window.addEventListener("audit-map-hover", st.onHover);
    window.addEventListener("audit-map-unhover", st.onUnhover);
    st.render = () => {
      const d = st.data;
      if (!d || d.idx === null || d.idx !== st.want || !d.thumb) { st.card.style.display = "none"; return; }
      st.img.src = d.thumb;
      st.txt.textContent = d.lines.join("\n");
      // Left of the pointer, or on its right where there is no room.
      st.card.style.display = "block";
      const w = st.card.offsetWidth, h = st.card.offsetHeight;
      const left = st.x - 16 - w >= 0 ? st.x - 16 - w : st.x + 16;
      st.card.style.left = left + "px";
      st.card.style.top = Math.max(0, Math.min(st.y - h / 2, window.innerHeight - h)) + "px";
      st.card.setAttribute("data-image-index", String(d.idx));
      st.shown = d.idx;
    };
  }
  st.data = data;
  st.rest = data.rest_ms;
  st.render();
  return () => {
    clearTimeout(st.timer);
    window.removeEventListener("audit-map-hover", st.onHover);
    window.removeEventListener("audit-map-unhover", st.onUnhover);
    delete root.__auditHover;
  };
}
"""

_CSS = """
.card { display: none; position: fixed; z-index: 1000; pointer-events: none; max-width: 224px;
        background: var(--st-background-color, #fff); color: var(--st-text-color, #222);
        border: 1px solid rgba(128, 128, 128, 0.5); border-radius: 6px; padding: 6px;
        box-shadow: 0 2px 8px rgba(0, 0, 0, 0.25); font: 12px/1.35 sans-serif; }
.card img { display: block; max-width: 212px; max-height: 212px; margin-bottom: 4px; }
.card .txt { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def _element() -> Any:
    return element(_NAME, js=_JS, css=_CSS)


def hovered_index(state: Any) -> int | None:
    """The image index the element last reported (its ``hovered`` state), or None; anything else is ignored."""
    try:
        value = state["hovered"] if isinstance(state, dict) else getattr(state, "hovered", None)
    except (KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        return None
    return int(value)


def hover_payload(pts: pd.DataFrame, index: int | None, thumb: Callable[[str], bytes | None]) -> dict[str, Any]:
    """The element's data for one rerun: the card of ``index`` (None: no card).

    Parameters
    ----------
    pts : frame of :func:`audit.mapview.map_points` (every point of the map, drawn or not)
    index : the hovered image index, from :func:`hovered_index`
    thumb : ``image_id -> JPEG bytes`` (None when the image cannot be read: the card then is not shown)
    """
    out: dict[str, Any] = {"rest_ms": REST_MS, "idx": None, "thumb": None, "lines": []}
    if index is None or pts.empty:
        return out
    row = pts[pts["image_index"].to_numpy() == index]
    if row.empty:
        return out
    r = row.iloc[0]
    data = thumb(str(r["image_id"]))
    if data is None:
        return out
    lines = [shown(r["image_id"]), f"given: {shown(r['given'])}", f"current: {shown(r['current'])}"]
    if not pd.isna(r["checks"]) and str(r["checks"]):
        lines.append(f"flagged by: {shown(r['checks'])}")
    out.update(idx=int(index), thumb="data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), lines=lines)
    return out


def mount(payload: dict[str, Any], *, key: str) -> Any:
    """Mount the element (no room on the page); its result's ``hovered`` is the image the pointer rests on."""
    return _element()(key=key, data=payload, default={"hovered": None}, height=0, on_hovered_change=lambda: None)
