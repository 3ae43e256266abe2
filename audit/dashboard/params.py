"""Values read from the page URL (``?page=review&image=17``), validated.

The URL is input anyone can craft and send to a reviewer. Only the page and
the image index are read from it; anything unknown, malformed, negative or
out of range falls back to the default, and nothing read here is ever
rendered (the page name is matched against a fixed list, the image index is
an int).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_INDEX", "image_from_url", "page_from_url"]

MAX_INDEX = 2**31 - 1  # image_index is a DuckDB INTEGER
_MAX_LEN = 64  # longer values are not looked at


def page_from_url(value: object, pages: Sequence[str], default: str) -> str:
    """The page of ``pages`` that ``value`` names (case-insensitive), else ``default``."""
    if not isinstance(value, str) or len(value) > _MAX_LEN:
        return default
    v = value.strip().lower()
    return next((p for p in pages if p.lower() == v), default)


def image_from_url(value: object) -> int | None:
    """A non-negative image index written in ASCII digits, at most :data:`MAX_INDEX`; else None."""
    if not isinstance(value, str):
        return None
    v = value.strip()
    # str.isdigit accepts '²' and other digits int() refuses; only ASCII digits are an index.
    if not v or len(v) > 10 or not v.isascii() or not v.isdigit():
        return None
    n = int(v)
    return n if n <= MAX_INDEX else None
