"""The Map's rules, shared by the page and the static pictures: which points are drawn, their colour groups, and
which images a selection holds; and the static figure itself.

* :func:`shown_points`: the points drawn (all, or a tiered sample beyond :data:`MAX_POINTS`);
* :func:`colour_groups`: the colour groups of one colouring, which the page's canvas
  (:mod:`audit.dashboard.mapcanvas`) and :func:`map_figure` both draw;
* :func:`selected_from_event`: the images inside a lasso, box or click;
* :func:`map_figure`: a plotly figure of the map, drawn for the pictures in reports/ (reports/map_report.py).
  The page itself no longer draws plotly: its ``Scattergl`` needs WebGL (mapcanvas says why).

Names are data: Plotly renders a subset of HTML in hover text and legend names (``<b>``, ``<br>``,
``<a href>``), so every user-controlled string is HTML-escaped before it reaches the figure, and
shows as typed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["LEGEND_MAX", "MAX_POINTS", "colour_groups", "map_figure", "selected_from_event", "shown_points"]

LEGEND_MAX = 20  # categories drawn as one legend entry each; more (ImageNet's 1,000) share one colour scale
# Points drawn at most: a rerun that changes the drawing sends every drawn point to the browser (~14 bytes a point
# as Arrow, mapcanvas) and the canvas draws each; beyond this a tiered sample is drawn (shown_points), and a lasso
# or box still selects every image inside it (selected_from_event reads its geometry).
MAX_POINTS = 15_000
_GREY = "#b8b8b8"
_FLAG = "#d62728"
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79",
    "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b",
)  # fmt: skip


def _esc(values: pd.Series) -> pd.Series:
    """``html.escape`` over a column, vectorised (50,000 names in ~50 ms instead of ~0.5 s)."""
    v = values.astype(str)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        v = v.str.replace(a, b, regex=False)
    return v


def _hover(pts: pd.DataFrame) -> np.ndarray:
    """One hover text per point: id, given and current label, what flagged it, confidence (all escaped)."""
    line = _esc(pts["image_id"]) + "<br>given: " + _esc(pts["given"]) + " · current: " + _esc(pts["current"])
    chk = _esc(pts["checks"])
    line = line.where(chk.eq(""), line + "<br>flagged by: " + chk)
    conf = pd.to_numeric(pts["confidence"], errors="coerce")
    pct = (conf * 100).round().astype("Int64").astype(str)
    line = line.where(conf.isna(), line + "<br>confidence " + pct + "%")
    return line.to_numpy(dtype=object)


def shown_points(
    pts: pd.DataFrame, keep: Sequence[int] | np.ndarray | None = None, *, limit: int = MAX_POINTS, seed: int = 0
) -> pd.DataFrame:
    """The points drawn: all of them up to ``limit``; beyond it ``limit`` of them, taken in tiers: the flagged
    points (by any check), then the filter's images (``keep``), then the rest; the tier that does not fit whole is
    a seeded uniform sample (the same sample on every rerun).

    Why every tier is capped: a Map selection sent to review becomes the filter, and the filter's images were all
    drawn; with the bench's 23,404 selected of 50,000, 25,000 points went to the browser (1.1 MB a run) and the
    Map page took over 1 s. A lasso or box still selects every image inside it, drawn or not.
    """
    if len(pts) <= limit:
        return pts
    flagged = pts["flagged"].astype(bool).to_numpy() | pts["checks"].astype(str).str.len().gt(0).to_numpy()
    kept = np.zeros(len(pts), dtype=bool)
    if keep is not None:
        kept = np.isin(pts["image_index"].to_numpy(), np.asarray(keep, dtype=np.int64)) & ~flagged
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(pts), dtype=bool)
    room = limit
    for tier in (flagged, kept, ~(flagged | kept)):
        ix = np.flatnonzero(tier)
        take = ix if len(ix) <= room else rng.choice(ix, room, replace=False)
        mask[take] = True
        room -= len(take)
    return pts[mask]


def colour_groups(pts: pd.DataFrame, colour: str) -> list[dict[str, object]]:
    """The map's colour groups, in drawing order (later on top): the one rule the page and the pictures share.

    Each group: ``name`` (legend text, user data: escape or show as text), ``mask`` (bool array over ``pts``),
    and either ``color`` (one CSS colour) or ``values`` (a number per point of the mask) with ``scale`` (a
    plotly colorscale name) and ``cmin``/``cmax``; ``size``, ``opacity`` and ``legend`` (False: no legend entry,
    one colour scale instead) where they differ from the default.
    """
    out: list[dict[str, object]] = []
    if colour in ("given", "current"):
        cats = pts[colour].astype(str)
        names = list(pd.unique(cats))
        if len(names) <= LEGEND_MAX:
            counts = cats.value_counts()
            for k, n in enumerate(sorted(names, key=lambda c: (-counts[c], c))):
                colour_k = _PALETTE[k % len(_PALETTE)]
                out.append({"name": f"{n} ({counts[n]:,})", "mask": (cats == n).to_numpy(), "color": colour_k})
        else:
            codes = pd.Categorical(cats).codes
            out.append({"name": f"{len(names):,} classes", "mask": np.ones(len(pts), dtype=bool), "values": codes,
                        "scale": "Turbo", "cmin": 0, "cmax": max(1, len(names) - 1), "legend": False})
    elif colour in ("flagged", "check", "reviewed"):
        on = pts["checks"].astype(str).str.len().gt(0) if colour == "check" else pts[colour].astype(bool)
        on = on.to_numpy()
        label = {"flagged": "flagged by the label check", "check": "flagged by a check", "reviewed": "reviewed"}
        out.append({"name": f"not {label[colour].split(' by')[0]} ({(~on).sum():,})", "mask": ~on, "color": _GREY,
                    "opacity": 0.5})
        out.append({"name": f"{label[colour]} ({on.sum():,})", "mask": on, "color": _FLAG, "size": 6})
    elif colour == "confidence":
        conf = pts["confidence"].astype(float).to_numpy()
        out.append({"name": "confidence", "mask": np.ones(len(pts), dtype=bool), "values": np.nan_to_num(conf, nan=0.0),
                    "scale": "Viridis", "cmin": 0, "cmax": 1, "legend": False})
    else:
        raise ValueError(f"unknown colour {colour!r}")
    return out  # fmt: skip


def map_figure(
    pts: pd.DataFrame,
    colour: str,
    highlight: Sequence[int] | np.ndarray | None = None,
    *,
    title: str | None = None,
    height: int = 640,
) -> object:
    """The map as a plotly ``Figure`` (the static pictures in reports/; the page draws the same groups on a canvas,
    :mod:`audit.dashboard.mapcanvas`).

    Parameters
    ----------
    pts : frame of :func:`audit.mapview.map_points`
    colour : key of :data:`audit.mapview.COLOURS`
    highlight : image indices to draw on top, outlined (the current filter's images); None: none
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    hover = _hover(pts) if len(pts) else np.array([], dtype=object)
    idx = pts["image_index"].to_numpy()
    x, y = pts["x"].to_numpy(), pts["y"].to_numpy()

    def add(mask: np.ndarray, name: str, **marker: object) -> None:
        fig.add_trace(
            go.Scattergl(
                x=x[mask], y=y[mask], mode="markers", name=html.escape(name), customdata=idx[mask],
                hovertext=hover[mask], hoverinfo="text", marker={"size": 5, **marker},
            )
        )  # fmt: skip

    for g in colour_groups(pts, colour):
        marker: dict[str, object] = {"opacity": g["opacity"]} if "opacity" in g else {}
        if "size" in g:
            marker["size"] = g["size"]
        if "values" in g:
            marker.update(color=g["values"], colorscale=g["scale"], cmin=g["cmin"], cmax=g["cmax"])
            if g["scale"] == "Viridis":
                marker["colorbar"] = {"title": str(g["name"])}
        else:
            marker["color"] = g["color"]
        add(g["mask"], str(g["name"]), **marker)  # type: ignore[arg-type]
        if g.get("legend") is False and g["scale"] == "Turbo":
            fig.update_layout(showlegend=False)
    if highlight is not None:
        on = np.isin(idx, np.asarray(highlight, dtype=np.int64))
        if on.any() and not on.all():
            ring = {"width": 1, "color": "black"}
            add(on, f"filter matches ({on.sum():,})", color="rgba(0,0,0,0)", size=8, line=ring)
    fig.update_layout(
        height=height,
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        title=html.escape(title) if title else None,
        dragmode="lasso",
        legend={"itemsizing": "constant"},
        xaxis={"showticklabels": False, "title": None},
        yaxis={"showticklabels": False, "title": None, "scaleanchor": "x"},
    )
    return fig


def _inside(x: np.ndarray, y: np.ndarray, px: Sequence[float], py: Sequence[float]) -> np.ndarray:
    """Even-odd rule: which points lie inside the polygon (px, py) (a lasso's path)."""
    px, py = np.asarray(px, dtype=float), np.asarray(py, dtype=float)
    inside = np.zeros(len(x), dtype=bool)
    j = len(px) - 1
    for i in range(len(px)):
        xi, yi, xj, yj = px[i], py[i], px[j], py[j]
        crosses = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= crosses & (x < at)
        j = i
    return inside


def selected_from_event(event: object, pts: pd.DataFrame | None = None) -> list[int]:
    """Image indices a box, lasso or click selected, from ``st.plotly_chart``'s event (sorted).

    With ``pts`` (every point of the map, drawn or not), a box or lasso selects every image inside its
    geometry, so a sampled drawing (:func:`shown_points`) loses nothing; a click selects the points clicked.
    """
    try:
        sel = event["selection"]  # type: ignore[index]
    except (KeyError, TypeError):
        return []
    out: set[int] = set()
    boxes = sel.get("box") or [] if isinstance(sel, dict) else []
    lassos = sel.get("lasso") or [] if isinstance(sel, dict) else []
    if pts is not None and (boxes or lassos) and len(pts):
        x, y = pts["x"].to_numpy(float), pts["y"].to_numpy(float)
        idx = pts["image_index"].to_numpy()
        hit = np.zeros(len(pts), dtype=bool)
        for b in boxes:
            (x0, x1), (y0, y1) = sorted(b["x"][:2]), sorted(b["y"][:2])
            hit |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        for lz in lassos:
            if len(lz.get("x") or ()) >= 3:
                hit |= _inside(x, y, lz["x"], lz["y"])
        return sorted(int(i) for i in idx[hit])
    for p in (sel.get("points") if isinstance(sel, dict) else None) or ():
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, list | tuple):
            cd = cd[0] if cd else None
        if cd is not None:
            out.add(int(cd))
    return sorted(out)
