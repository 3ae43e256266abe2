"""The dashboard's own Streamlit components-v2 elements (the Map's canvas and hover card, the Review strips):
each registered once, on first use, because registering needs Streamlit's runtime."""

from __future__ import annotations

from typing import Any

__all__ = ["element"]

_REGISTERED: dict[str, Any] = {}  # name -> the registered element, for the life of the process


def element(name: str, *, js: str, css: str) -> Any:
    """The components-v2 element ``name`` drawn by ``js`` and styled by ``css`` (not iframed; its style isolated)."""
    got = _REGISTERED.get(name)
    if got is None:
        import streamlit as st

        got = _REGISTERED[name] = st.components.v2.component(name, js=js, css=css, isolate_styles=True)
    return got
