// The Map page's 2-D canvas scatter (audit/dashboard/mapcanvas.py): a Streamlit components-v2 element.
export default function (component) {
  const { data, setStateValue, parentElement } = component;
  const root = parentElement;
  let S = root.__auditMap;
  if (!S) {
    S = root.__auditMap = { view: null, mode: "lasso", drag: null, sel: null, hoverIdx: null, raf: 0 };
    const wrap = document.createElement("div"); wrap.className = "wrap";
    const bar = document.createElement("div"); bar.className = "bar";
    const modes = [["lasso", "Lasso"], ["box", "Box"], ["pan", "Pan"]];
    S.buttons = {};
    for (const [m, label] of modes) {
      const b = document.createElement("button"); b.textContent = label; b.type = "button";
      b.onclick = () => { S.mode = m; for (const k in S.buttons) S.buttons[k].classList.toggle("on", k === m); };
      S.buttons[m] = b; bar.appendChild(b);
    }
    S.buttons.lasso.classList.add("on");
    const reset = document.createElement("button"); reset.textContent = "Reset view"; reset.type = "button";
    reset.onclick = () => { S.view = null; S.draw(); };
    const clear = document.createElement("button"); clear.textContent = "Clear selection"; clear.type = "button";
    clear.onclick = () => { S.sel = null; setStateValue("selection", null); S.drawOverlay(); };
    bar.append(reset, clear);
    const body = document.createElement("div"); body.className = "body";
    // Two layers: the points (redrawn when the data or the view changes) and, above them, the selection and the
    // lasso being drawn (redrawn on every pointer move, without touching the points).
    const stack = document.createElement("div"); stack.className = "stack";
    const cv = document.createElement("canvas"); cv.setAttribute("data-testid", "auditMapCanvas");
    const ov = document.createElement("canvas"); ov.className = "overlay";
    stack.append(cv, ov);
    const legend = document.createElement("div"); legend.className = "legend";
    body.append(stack, legend); wrap.append(bar, body); root.appendChild(wrap);
    Object.assign(S, { cv, ov, body, legend, ctx: cv.getContext("2d"), octx: ov.getContext("2d") });

    // Data <-> pixels: one scale for both axes (the map's distances are isotropic), centred, 12 px margin.
    S.fit = () => {
      const d = S.d, w = S.w, h = S.h;
      const sx = (w - 24) / Math.max(1e-9, d.x1 - d.x0), sy = (h - 24) / Math.max(1e-9, d.y1 - d.y0);
      const k = Math.min(sx, sy);
      return { k, cx: (d.x0 + d.x1) / 2, cy: (d.y0 + d.y1) / 2 };
    };
    S.px = (x, y) => { const v = S.view; return [S.w / 2 + (x - v.cx) * v.k, S.h / 2 - (y - v.cy) * v.k]; };
    S.data = (px, py) => { const v = S.view; return [v.cx + (px - S.w / 2) / v.k, v.cy - (py - S.h / 2) / v.k]; };
    // For tests and benchmarks: where drawn point k is on screen (client coordinates).
    cv.auditCount = () => S.d.x.length;
    cv.auditPoint = (k) => {
      const r = cv.getBoundingClientRect(), [px, py] = S.px(S.d.x[k], S.d.y[k]);
      return { x: r.left + px, y: r.top + py, idx: S.d.idx[k] };
    };

    S.draw = () => {
      const d = S.d; if (!d) return;
      const dpr = window.devicePixelRatio || 1, w = Math.max(200, Math.floor(S.body.clientWidth - 210));
      S.w = w; S.h = d.height; S.dpr = dpr;
      for (const c of [S.cv, S.ov]) {
        if (c.width !== Math.round(w * dpr) || c.height !== Math.round(S.h * dpr)) {
          c.width = Math.round(w * dpr); c.height = Math.round(S.h * dpr);
          c.style.width = w + "px"; c.style.height = S.h + "px";
        }
      }
      if (!S.view) S.view = S.fit();
      const ctx = S.ctx; ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.clearRect(0, 0, w, S.h);
      const n = d.x.length, gx = new Float32Array(n), gy = new Float32Array(n);
      for (let i = 0; i < n; i++) { const p = S.px(d.x[i], d.y[i]); gx[i] = p[0]; gy[i] = p[1]; }
      S.gx = gx; S.gy = gy;
      for (let g = 0; g < d.colours.length; g++) {
        const r = d.sizes[g] / 2; ctx.globalAlpha = d.alphas[g]; ctx.fillStyle = d.colours[g]; ctx.beginPath();
        for (let i = 0; i < n; i++) {
          if (d.g[i] !== g) continue;
          const x = gx[i], y = gy[i];
          if (x < -5 || y < -5 || x > w + 5 || y > S.h + 5) continue;
          ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 6.2832);
        }
        ctx.fill();
      }
      ctx.globalAlpha = 1;
      if (d.ring.length) {
        ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.beginPath();
        for (const i of d.ring) { ctx.moveTo(gx[i] + 4, gy[i]); ctx.arc(gx[i], gy[i], 4, 0, 6.2832); }
        ctx.stroke();
      }
      S.drawOverlay();
      S.cv.setAttribute("data-drawn", String(d.key));
    };
    S.drawOverlay = () => {
      if (!S.view) return;
      const octx = S.octx; octx.setTransform(S.dpr, 0, 0, S.dpr, 0, 0); octx.clearRect(0, 0, S.w, S.h);
      const sel = S.sel;
      if (sel && (sel.lasso || sel.box)) {
        octx.strokeStyle = "rgba(30, 30, 30, 0.8)"; octx.fillStyle = "rgba(120, 120, 120, 0.12)";
        octx.setLineDash([4, 3]); octx.beginPath();
        if (sel.lasso) {
          sel.lasso.x.forEach((x, j) => { const [a, b] = S.px(x, sel.lasso.y[j]); j ? octx.lineTo(a, b) : octx.moveTo(a, b); });
          octx.closePath();
        } else {
          const [a, b] = S.px(sel.box.x[0], sel.box.y[0]), [c, e] = S.px(sel.box.x[1], sel.box.y[1]);
          octx.rect(Math.min(a, c), Math.min(b, e), Math.abs(c - a), Math.abs(e - b));
        }
        octx.fill(); octx.stroke(); octx.setLineDash([]);
      }
      if (S.drag && S.drag.path) {  // the lasso or box being drawn
        octx.strokeStyle = "#333"; octx.beginPath();
        if (S.drag.kind === "lasso") { S.drag.path.forEach(([a, b], j) => j ? octx.lineTo(a, b) : octx.moveTo(a, b)); }
        else { const [a, b] = S.drag.path[0], [c, e] = S.drag.path[S.drag.path.length - 1]; octx.rect(a, b, c - a, e - b); }
        octx.stroke();
      }
    };
    S.laterOverlay = () => { if (!S.oraf) S.oraf = requestAnimationFrame(() => { S.oraf = 0; S.drawOverlay(); }); };
    S.later = () => { if (!S.raf) S.raf = requestAnimationFrame(() => { S.raf = 0; S.draw(); }); };

    // The drawn point nearest the pointer, within 6 px (a linear scan of 15,000 screen positions: ~0.1 ms).
    S.nearest = (px, py) => {
      let best = -1, bd = 36; const gx = S.gx, gy = S.gy;
      if (!gx) return -1;
      for (let i = 0; i < gx.length; i++) { const dx = gx[i] - px, dy = gy[i] - py, q = dx * dx + dy * dy; if (q < bd) { bd = q; best = i; } }
      return best;
    };
    const pos = (ev) => { const r = cv.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; };
    const unhover = () => { if (S.hoverIdx !== null) { S.hoverIdx = null; window.dispatchEvent(new CustomEvent("audit-map-unhover")); } };
    cv.addEventListener("mousedown", (ev) => {
      if (ev.button !== 0) return;
      unhover();
      S.drag = { kind: S.mode, start: pos(ev), path: [pos(ev)], view: { ...S.view } };
      ev.preventDefault();
    });
    window.addEventListener("mousemove", S.onMove = (ev) => {
      if (!S.d) return;
      const p = pos(ev);
      if (S.drag) {
        if (S.drag.kind === "pan") {
          const v = S.drag.view; S.view = { k: v.k, cx: v.cx - (p[0] - S.drag.start[0]) / v.k, cy: v.cy + (p[1] - S.drag.start[1]) / v.k };
          S.later();
        } else { S.drag.path.push(p); S.laterOverlay(); }
        return;
      }
      // In a shadow root a window listener sees the host as the target: the real one is first on the path.
      if (ev.composedPath()[0] !== cv) { unhover(); return; }
      const i = S.nearest(p[0], p[1]);
      if (i < 0) { unhover(); return; }
      const idx = S.d.idx[i];
      window.dispatchEvent(new CustomEvent("audit-map-hover", { detail: { idx, x: ev.clientX, y: ev.clientY } }));
      S.hoverIdx = idx;
    });
    window.addEventListener("mouseup", S.onUp = (ev) => {
      const dr = S.drag; if (!dr) return; S.drag = null;
      // Moved: any point of the path away from the start (a closed lasso ends where it began).
      const p = pos(ev), moved = dr.path.some(([a, b]) => Math.hypot(a - dr.start[0], b - dr.start[1]) > 3);
      if (dr.kind === "pan") { S.draw(); return; }
      if (!moved) {  // a click: the point under it, if any
        const i = S.nearest(p[0], p[1]);
        S.sel = i < 0 ? null : { points: [S.d.idx[i]] };
      } else if (dr.kind === "lasso" && dr.path.length >= 3) {
        const xs = [], ys = []; for (const [a, b] of dr.path) { const [x, y] = S.data(a, b); xs.push(x); ys.push(y); }
        S.sel = { lasso: { x: xs, y: ys } };
      } else {
        const [x0, y0] = S.data(...dr.start), [x1, y1] = S.data(...p);
        S.sel = { box: { x: [Math.min(x0, x1), Math.max(x0, x1)], y: [Math.min(y0, y1), Math.max(y0, y1)] } };
      }
      S.drawOverlay();
      setStateValue("selection", S.sel);
    });
    cv.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const p = pos(ev), [x, y] = S.data(p[0], p[1]), f = Math.exp(-ev.deltaY * 0.0015), v = S.view;
      const k = v.k * f;  // keep the point under the pointer where it is
      S.view = { k, cx: x - (p[0] - S.w / 2) / k, cy: y + (p[1] - S.h / 2) / k };
      S.later();
    }, { passive: false });
    cv.addEventListener("mouseleave", () => { if (!S.drag) unhover(); });
    S.ro = new ResizeObserver(() => S.later()); S.ro.observe(wrap);
  }
  // The points arrive as an Arrow table (mapcanvas.payload): each column as a typed array.
  const t = data.points, col = (name) => (t && t.getChild(name) ? t.getChild(name).toArray() : new Float32Array(0));
  if (!S.d || S.d.key !== data.key) {
    const ringOn = col("ring"), ring = [];
    for (let i = 0; i < ringOn.length; i++) if (ringOn[i]) ring.push(i);
    const d = { ...data, x: col("x"), y: col("y"), idx: col("idx"), g: col("g"), ring };
    if (S.d && (S.d.x0 !== d.x0 || S.d.x1 !== d.x1 || S.d.y0 !== d.y0 || S.d.y1 !== d.y1)) S.view = null;  // another map
    S.d = d;
    S.sel = d.selection;
    // The legend: a swatch and a name per group, or the colour scale's ends.
    S.legend.replaceChildren();
    for (const e of d.legend) {
      const row = document.createElement("div"); row.className = "item";
      const sw = document.createElement("span"); sw.className = "sw";
      sw.style.background = e.gradient ? "linear-gradient(to right, " + e.gradient.join(", ") + ")" : e.colour;
      if (e.gradient) sw.classList.add("grad");
      if (e.ring) sw.classList.add("ring");
      const t = document.createElement("span"); t.textContent = e.name;
      row.append(sw, t); S.legend.appendChild(row);
    }
    S.draw();
  }
  return () => {
    window.removeEventListener("mousemove", S.onMove); window.removeEventListener("mouseup", S.onUp);
    if (S.ro) S.ro.disconnect(); delete root.__auditMap;
  };
}
