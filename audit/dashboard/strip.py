"""A strip of thumbnail cards, each with one button: the Review page's partner images (duplicates), its nearest
images and its queue; the Map's selection.

Why one element and not Streamlit columns of ``st.image`` + ``st.text`` + ``st.button``: a decision on the Review
page redraws every card. As Streamlit elements the two strips were ~45 of them (8 neighbours and 7 queue images,
three elements each), and the browser's part of a decision on a 50,000-image workspace was ~0.4 s of its ~1.2 s
(reports/DASHBOARD.md). As one components-v2 element (not iframed) each strip is a single element whose cards the
browser builds in a few milliseconds.

* :func:`card` is what one card shows: its thumbnail (a ``data:`` URL of JPEG bytes this process made, so the
  browser requests nothing; or why it is not shown), its text lines and its button's label;
* :func:`draw` mounts the strip; a click on a card's button sends that card's image index as the element's
  ``open`` trigger, and the strip's ``on_open`` callback runs with it before the script reruns, as a
  ``st.button``'s ``on_click`` would.

User-controlled text (ids, class names) reaches the cards through ``textContent`` only: data, never markup.
"""

from __future__ import annotations

import base64
import hashlib
import json
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from audit.dashboard.elements import element
from audit.dashboard.ui import shown

__all__ = ["card", "draw", "opened_index"]

_NAME = "audit_strip"
_HERE = Path(__file__).with_name
# The element's code and style ship beside this module (package data, pyproject.toml).
_JS = _HERE("strip.js").read_text(encoding="utf-8")
_CSS = _HERE("strip.css").read_text(encoding="utf-8")


def _element() -> Any:
    return element(_NAME, js=_JS, css=_CSS)


def card(
    index: int,
    lines: Sequence[str],
    *,
    button: str,
    thumb: bytes | None,
    why: str = "",
    current: bool = False,
    mark: bool = False,
) -> dict[str, Any]:
    """One card of a strip.

    Parameters
    ----------
    index : the image the card's button opens
    lines : its text, one entry per line (shown as given, never as markup; pass it through ``shown``)
    button : the button's label
    thumb : JPEG bytes of the thumbnail, or None (``why`` is then shown in its place)
    current : the image under review: its button is drawn pressed and cannot be clicked
    mark : outline the thumbnail (a near-duplicate of the image under review)
    """
    src = "data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii") if thumb is not None else None
    return {
        "idx": int(index),
        "lines": [str(x) for x in lines],
        "button": str(button),
        "thumb": src,
        "why": shown(why) if thumb is None else "",
        "current": bool(current),
        "mark": bool(mark),
    }


def opened_index(value: Any) -> int | None:
    """The image index a strip's ``open`` trigger carries, or None for anything else (a stale or odd value)."""
    try:
        v = value["open"] if isinstance(value, dict) else getattr(value, "open", None)
    except (KeyError, TypeError):
        return None
    if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0:
        return int(v)
    return None


def draw(
    cards: Sequence[dict[str, Any]],
    *,
    key: str,
    columns: int,
    size: int,
    on_open: Callable[[int], None],
    boxed: bool = False,
) -> None:
    """Mount a strip of ``cards`` laid out ``columns`` to a row, thumbnails at most ``size`` px; a click on a
    card's button calls ``on_open(index)`` before the rerun. ``boxed``: each card in a bordered box, as the
    gallery's (``st.container(border=True)``)."""
    import streamlit as st

    def _opened() -> None:
        idx = opened_index(st.session_state.get(key))
        if idx is not None:
            on_open(idx)

    data: dict[str, Any] = {
        "cards": list(cards), "columns": max(1, int(columns)), "size": int(size), "boxed": bool(boxed)
    }  # fmt: skip
    # A digest of what is drawn: the element rebuilds its cards only when it changes.
    data["key"] = hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=8).hexdigest()
    _element()(key=key, data=data, default={}, on_open_change=_opened)
