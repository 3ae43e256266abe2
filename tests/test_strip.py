"""The Review page's thumbnail strips (audit.dashboard.strip): what a card carries, and what a click reads back."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from audit.dashboard import strip


def test_a_card_inlines_its_thumbnail_and_keeps_names_as_given_text():
    jpeg = b"\xff\xd8\xff\xe0 not really a jpeg"
    got = strip.card(7, ["<b>**pot**</b>", "0.912 · #7"], button="Open", thumb=jpeg, mark=True)
    assert got["idx"] == 7 and got["button"] == "Open" and got["mark"] and not got["current"]
    assert got["lines"] == ["<b>**pot**</b>", "0.912 · #7"]  # the element sets them as textContent
    assert base64.b64decode(got["thumb"].removeprefix("data:image/jpeg;base64,")) == jpeg
    missing = strip.card(3, ["x"], button="4", thumb=None, why="cannot read image: gone\u200b", current=True)
    assert missing["thumb"] is None and missing["current"] and "gone" in missing["why"]
    assert "\u200b" not in missing["why"]  # an invisible character is shown visibly (ui.shown)


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.lists(st.integers())))
def test_only_a_non_negative_integer_opens_an_image(v):
    want = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
    assert strip.opened_index({"open": v}) == want
    assert strip.opened_index(None) is None and strip.opened_index({}) is None
