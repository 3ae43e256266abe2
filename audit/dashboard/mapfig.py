"""The Map page's figure: one WebGL scatter of the stored map, coloured by a chosen fact, filter matches on top.

Plotly's ``Scattergl`` draws 50,000 points in the browser in one WebGL context (SVG would make one
element per point); the server sends each point's coordinates, its colour value and a short hover
line once per draw. The same function draws the static pictures in reports/ (reports/map_report.py).

Names are data: Plotly renders a subset of HTML in hover text and legend names (``<b>``, ``<br>``,
``<a href>``), so every user-controlled string is HTML-escaped before it reaches the figure, and
shows as typed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["LEGEND_MAX", "map_figure", "selected_from_event"]

LEGEND_MAX = 20  # categories drawn as one legend entry each; more (ImageNet's 1,000) share one colour scale
_GREY = "#b8b8b8"
_FLAG = "#d62728"
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79",
    "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b",
)  # fmt: skip


def _esc(values: pd.Series) -> list[str]:
    return [html.escape(str(v)) for v in values]


def _hover(pts: pd.DataFrame) -> list[str]:
    """One hover line per point: id, given and current label, what flagged it (all escaped)."""
    out = []
    for iid, given, cur, chk, conf in zip(
        _esc(pts["image_id"]), _esc(pts["given"]), _esc(pts["current"]), _esc(pts["checks"]), pts["confidence"],
        strict=True,
    ):
        line = f"{iid}<br>given: {given} · current: {cur}"
        if chk:
            line += f"<br>flagged by: {chk}"
        if conf is not None and not pd.isna(conf):
            line += f"<br>confidence {float(conf):.0%}"
        out.append(line)
    return out


def map_figure(
    pts: pd.DataFrame,
    colour: str,
    highlight: Sequence[int] | np.ndarray | None = None,
    *,
    title: str | None = None,
    height: int = 640,
) -> object:
    """The map as a plotly ``Figure``.

    Parameters
    ----------
    pts : frame of :func:`audit.mapview.map_points`
    colour : key of :data:`audit.mapview.COLOURS`
    highlight : image indices to draw on top, outlined (the current filter's images); None: none
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    hover = np.asarray(_hover(pts), dtype=object) if len(pts) else np.array([], dtype=object)
    idx = pts["image_index"].to_numpy()
    x, y = pts["x"].to_numpy(), pts["y"].to_numpy()

    def add(mask: np.ndarray, name: str, **marker: object) -> None:
        fig.add_trace(
            go.Scattergl(
                x=x[mask], y=y[mask], mode="markers", name=html.escape(name), customdata=idx[mask],
                hovertext=hover[mask], hoverinfo="text", marker={"size": 5, **marker},
            )
        )  # fmt: skip

    if colour in ("given", "current"):
        cats = pts[colour].astype(str)
        names = list(pd.unique(cats))
        if len(names) <= LEGEND_MAX:
            counts = cats.value_counts()
            for k, n in enumerate(sorted(names, key=lambda c: (-counts[c], c))):
                add((cats == n).to_numpy(), f"{n} ({counts[n]:,})", color=_PALETTE[k % len(_PALETTE)])
        else:
            codes = pd.Categorical(cats).codes
            add(np.ones(len(pts), dtype=bool), f"{len(names):,} classes", color=codes, colorscale="Turbo")
            fig.update_layout(showlegend=False)
    elif colour in ("flagged", "check", "reviewed"):
        on = pts["checks"].astype(str).str.len().gt(0) if colour == "check" else pts[colour].astype(bool)
        on = on.to_numpy()
        label = {"flagged": "flagged by the label check", "check": "flagged by a check", "reviewed": "reviewed"}
        add(~on, f"not {label[colour].split(' by')[0]} ({(~on).sum():,})", color=_GREY, opacity=0.5)
        add(on, f"{label[colour]} ({on.sum():,})", color=_FLAG, size=6)
    elif colour == "confidence":
        conf = pts["confidence"].astype(float).to_numpy()
        add(
            np.ones(len(pts), dtype=bool), "confidence", color=np.nan_to_num(conf, nan=0.0), colorscale="Viridis",
            cmin=0, cmax=1, colorbar={"title": "confidence"},
        )  # fmt: skip
    else:
        raise ValueError(f"unknown colour {colour!r}")
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


def selected_from_event(event: object) -> list[int]:
    """Image indices of the points a box, lasso or click selected, from ``st.plotly_chart``'s event (sorted)."""
    try:
        points = event["selection"]["points"]  # type: ignore[index]
    except (KeyError, TypeError):
        return []
    out = set()
    for p in points or ():
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, list | tuple):
            cd = cd[0] if cd else None
        if cd is not None:
            out.add(int(cd))
    return sorted(out)
