"""The Map page's scatter: every drawn point on one 2-D canvas, with lasso, box, click, zoom and pan.

Why not ``st.plotly_chart``: its ``Scattergl`` needs WebGL, which a browser without a GPU either lacks (recent
Chromium turns software WebGL off) or emulates in SwiftShader on the CPU. Measured on this project's 2-core
machine, every redraw then cost Chromium's GPU process 1-6 CPU-seconds (colour changes 1.2-4.2 s, drawing a
lasso 6 s; reports/DASHBOARD.md), while the same 15,000 points on a 2-D canvas draw in 10-100 ms and a rerun
takes ~0.4 s. A 2-D canvas works in every browser, GPU or not.

This module is a Streamlit components-v2 element (not iframed) and the payload it draws:

* :func:`payload`: per drawn point (one frame, sent as Arrow) its coordinates, image index and colour group
  (the groups, colours and legend of :func:`audit.dashboard.mapfig.colour_groups`, the same rule the static
  pictures in reports/ use; a colour scale is cut into :data:`SCALE_STEPS` steps), and which points are outlined
  (the filter's images);
* the element draws them, keeps its zoom and pan across reruns, and reports a selection as its ``selection``
  state: ``{"lasso": {"x": [...], "y": [...]}}`` or ``{"box": {"x": [x0, x1], "y": [y0, y1]}}`` in data
  coordinates, or ``{"points": [image_index]}`` for a click; :func:`selection_event` turns it into the shape
  :func:`audit.dashboard.mapfig.selected_from_event` reads (which selects every image inside the geometry,
  drawn or not);
* while the pointer moves over a point it sends ``audit-map-hover`` events (``detail``: image index and
  pointer position) to the page, and ``audit-map-unhover`` when it leaves: the hover card
  (:mod:`audit.dashboard.maphover`) listens to those.

Names reach the legend through ``textContent`` only (data, never markup).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.dashboard.elements import element
from audit.dashboard.mapfig import colour_groups
from audit.dashboard.ui import shown

__all__ = ["SCALE_STEPS", "draw", "payload", "selection_event"]

SCALE_STEPS = 48  # a colour scale (confidence, 1,000 classes) is drawn in this many colours
_NAME = "audit_map"

_HERE = Path(__file__).with_name
# The element's code and style ship beside this module (package data, pyproject.toml).
_JS = _HERE("mapcanvas.js").read_text(encoding="utf-8")
_CSS = _HERE("mapcanvas.css").read_text(encoding="utf-8")


def _element() -> Any:
    return element(_NAME, js=_JS, css=_CSS)


def _scale_colours(scale: str, steps: int) -> list[str]:
    from plotly.colors import sample_colorscale

    return list(sample_colorscale(scale, [i / max(1, steps - 1) for i in range(steps)]))


def payload(
    pts: pd.DataFrame,
    colour: str,
    highlight: Sequence[int] | np.ndarray | None = None,
    *,
    height: int = 640,
    selection: dict[str, Any] | None = None,
    matches: int | None = None,
) -> dict[str, Any]:
    """What the element draws: the points of ``pts`` (already down-sampled, :func:`mapfig.shown_points`) in
    the colour groups of ``colour``, the filter's images (``highlight``) outlined, and the selection kept.

    Parameters
    ----------
    pts : frame of :func:`audit.mapview.map_points` (image_index, x, y and the columns the colouring reads)
    colour : key of :data:`audit.mapview.COLOURS`
    highlight : image indices outlined; None: none
    selection : the element's last ``selection`` state, drawn again after a redraw
    matches : how many of the whole map's images the filter keeps (``pts`` may be a sample of the map: the
        legend then says how many of them are drawn); None: as many as are drawn
    """
    n = len(pts)
    group = np.zeros(n, dtype=np.int32)
    colours: list[str] = []
    sizes: list[float] = []
    alphas: list[float] = []
    legend: list[dict[str, Any]] = []
    for g in colour_groups(pts, colour):
        mask = np.asarray(g["mask"], dtype=bool)
        size, alpha = float(g.get("size", 5)), float(g.get("opacity", 1.0))  # type: ignore[arg-type]
        if "values" in g:
            scale = _scale_colours(str(g["scale"]), SCALE_STEPS)
            lo, hi = float(g["cmin"]), float(g["cmax"])  # type: ignore[arg-type]
            v = np.asarray(g["values"], dtype=float)[mask]  # a scale group's values cover every point
            step = np.round((v - lo) / max(hi - lo, 1e-12) * (SCALE_STEPS - 1))
            step = np.clip(step, 0, SCALE_STEPS - 1).astype(np.int32)
            group[mask] = len(colours) + step
            colours += scale
            sizes += [size] * SCALE_STEPS
            alphas += [alpha] * SCALE_STEPS
            ends = f"{shown(str(g['name']))}: {lo:g} to {hi:g}" if g["scale"] == "Viridis" else shown(str(g["name"]))
            legend.append({"name": ends, "gradient": [scale[0], scale[len(scale) // 2], scale[-1]]})
        else:
            group[mask] = len(colours)
            colours.append(str(g["color"]))
            sizes.append(size)
            alphas.append(alpha)
            legend.append({"name": shown(str(g["name"])), "colour": str(g["color"])})
    idx = pts["image_index"].to_numpy(dtype=np.int64)
    ring = np.zeros(n, dtype=np.uint8)
    if highlight is not None and n:
        on = np.isin(idx, np.asarray(highlight, dtype=np.int64))
        if on.any() and not on.all():
            ring = on.astype(np.uint8)
            legend.append({"name": _matches_name(int(on.sum()), matches), "colour": "#000", "ring": True})
    x = pts["x"].to_numpy(dtype=np.float32) if n else np.zeros(0, dtype=np.float32)
    y = pts["y"].to_numpy(dtype=np.float32) if n else np.zeros(0, dtype=np.float32)
    # The points as one frame: Streamlit sends a frame at the first level of ``data`` as Arrow (typed columns,
    # ~14 bytes a point; the JSON lists were ~46 and were encoded again for the digest and the message), and the
    # element reads each column as a typed array. int32 indices: an int64 column reaches JavaScript as BigInt.
    points = pd.DataFrame({"x": x, "y": y, "idx": idx.astype(np.int32), "g": group.astype(np.int16), "ring": ring})
    small: dict[str, Any] = {
        "colours": colours, "sizes": sizes, "alphas": alphas, "legend": legend, "height": int(height),
        "x0": float(x.min()) if n else 0.0, "x1": float(x.max()) if n else 1.0,
        "y0": float(y.min()) if n else 0.0, "y1": float(y.max()) if n else 1.0,
    }  # fmt: skip
    # A digest of what is drawn: the element redraws only when it changes (a hover's rerun changes nothing).
    h = hashlib.blake2b(json.dumps(small, sort_keys=True).encode(), digest_size=8)
    for col in points.columns:
        h.update(points[col].to_numpy().tobytes())
    out: dict[str, Any] = {"points": points, **small, "key": h.hexdigest()}
    out["selection"] = selection
    return out


def _matches_name(drawn: int, matches: int | None) -> str:
    """The outline's legend entry: the filter's images on the map, and how many of them are drawn when fewer."""
    if matches is None or matches <= drawn:
        return f"filter matches ({drawn:,})"
    return f"filter matches ({matches:,}; {drawn:,} drawn)"


def _numbers(v: Any) -> bool:
    """A list of finite real numbers (not bools): what a lasso's or box's coordinates must be."""
    return isinstance(v, list) and all(
        isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in v
    )


def selection_event(state: Any) -> dict[str, Any]:
    """The element's ``selection`` state as ``st.plotly_chart``'s event shape (``{"selection": {...}}``), which
    :func:`audit.dashboard.mapfig.selected_from_event` reads; an empty selection for anything unexpected."""
    try:
        sel = state["selection"] if isinstance(state, dict) else getattr(state, "selection", None)
    except (KeyError, TypeError):
        sel = None
    out: dict[str, Any] = {"points": [], "box": [], "lasso": []}
    if isinstance(sel, dict):
        lz, bx, pt = sel.get("lasso"), sel.get("box"), sel.get("points")
        if isinstance(lz, dict) and _numbers(lz.get("x")) and _numbers(lz.get("y")) and len(lz["x"]) == len(lz["y"]):
            out["lasso"] = [{"x": [float(v) for v in lz["x"]], "y": [float(v) for v in lz["y"]]}]
        elif isinstance(bx, dict) and _numbers(bx.get("x")) and _numbers(bx.get("y")):
            if len(bx["x"]) >= 2 and len(bx["y"]) >= 2:
                out["box"] = [{"x": [float(v) for v in bx["x"][:2]], "y": [float(v) for v in bx["y"][:2]]}]
        elif isinstance(pt, list):
            ints = [v for v in pt if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0]
            out["points"] = [{"customdata": int(v)} for v in ints]
    return {"selection": out}


def draw(data: dict[str, Any], *, key: str, selection: dict[str, Any] | None = None) -> Any:
    """Mount the element; its result's ``selection`` is the reviewer's last lasso, box or click (or None).

    ``selection``: the element's state when it mounts (a selection kept from an earlier visit to the page; the
    element draws it from ``data["selection"]``)."""
    return _element()(key=key, data=data, default={"selection": selection}, on_selection_change=lambda: None)
