"""User-controlled text on the dashboard: shown as plain text, never as Markdown.

File and folder names, image ids, class names and keys, model names (which
come from file names), reviewer names, reasons, workspace and dataset paths
and error messages that quote them are all data a user (or whoever made the
dataset) controls. Streamlit renders Markdown, KaTeX, colour directives, emoji
shortcodes and images in ``st.markdown``, ``st.caption``, headers, alerts,
toasts, metric labels and in the labels of buttons, expanders, tabs, radios
and other widgets, so a file named ``![](http://host/x.png)`` would make the
browser fetch that image. Backslash-escaping cannot make that safe (emoji
shortcodes and ``:material/...:`` icons are substituted after the escapes are
resolved, and newlines cannot be kept), so the rule is structural:

* user text goes only into plain-text elements: ``st.text``, ``st.code``,
  dataframes, chart data, and the options of ``st.selectbox`` /
  ``st.multiselect`` (which Streamlit renders as text);
* everything that renders Markdown (headers, captions, alerts, widget labels,
  help) carries fixed developer text only; :func:`alert` pairs a fixed alert
  with the user part as text below it.

:func:`shown` also makes control and format characters visible (a newline as
``␊``, a right-to-left override as ``⟨U+202E⟩``), so a name cannot spoof
another on screen or split into lines.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import pandas as pd
import streamlit as st

__all__ = ["alert", "plain_frame", "shown"]

_PICTURES = {"\n": "␊", "\r": "␍", "\t": "␉"}
# Control, format (bidi overrides, zero-width), surrogate and line/paragraph separators.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _visible(ch: str) -> str:
    if ch in _PICTURES:
        return _PICTURES[ch]
    if unicodedata.category(ch) in _HIDDEN:
        return f"⟨U+{ord(ch):04X}⟩"
    return ch


def shown(value: Any) -> str:
    """``value`` as the text to display: ``str(value)`` with invisible characters made visible; '' for None."""
    s = "" if value is None else str(value)
    if s.isprintable():  # the usual case: nothing to replace
        return s
    return "".join(_visible(ch) for ch in s)


def plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells (and text index) went through :func:`shown`, for tables and charts.

    Missing cells become None (shown empty).
    """
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = pd.Series(
                [None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else shown(v) for v in out[col]],
                index=out.index,
                dtype=object,
            )
    if out.index.dtype == object or pd.api.types.is_string_dtype(out.index):
        out.index = pd.Index([shown(v) for v in out.index], name=out.index.name)
    return out


def alert(kind: str, title: str, detail: Any = None) -> None:
    """A coloured ``st.<kind>`` box with the fixed ``title`` (developer text), and ``detail`` as plain text below.

    ``kind`` is one of error, warning, info, success. ``detail`` is anything a
    user controls: an error message quoting a path, an image id.
    """
    if kind not in ("error", "warning", "info", "success"):
        raise ValueError(f"unknown alert kind {kind!r}")
    getattr(st, kind)(title)
    if detail is not None and str(detail) != "":
        st.text(shown(detail))
