// A row (or rows) of thumbnail cards with one button each: the Review page's partners, neighbours and queue;
// the Map's selection
// (audit/dashboard/strip.py). A Streamlit components-v2 element; names are set as textContent only.
export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  const root = parentElement;
  if (!data || root.__auditStripKey === data.key) return; // a rerun that changed nothing redraws nothing
  root.__auditStripKey = data.key;
  let grid = root.querySelector(".strip");
  if (!grid) {
    grid = document.createElement("div"); grid.className = "strip"; grid.setAttribute("data-testid", "auditStrip");
    root.appendChild(grid);
  }
  grid.classList.toggle("boxed", !!data.boxed);
  grid.style.setProperty("--cols", String(data.columns));
  grid.style.setProperty("--size", data.size + "px");
  const cards = [];
  for (const c of data.cards) {
    const card = document.createElement("div");
    card.className = "card" + (c.current ? " current" : "") + (c.mark ? " mark" : "");
    card.setAttribute("data-testid", "auditStripCard"); card.setAttribute("data-idx", String(c.idx));
    if (c.thumb) {
      const img = document.createElement("img"); img.src = c.thumb; img.alt = ""; img.loading = "lazy";
      card.appendChild(img);
    } else {
      const why = document.createElement("div"); why.className = "why"; why.textContent = c.why; card.appendChild(why);
    }
    const text = document.createElement("div"); text.className = "text"; text.textContent = c.lines.join("\n");
    const b = document.createElement("button"); b.type = "button"; b.textContent = c.button;
    b.disabled = !!c.current;
    b.onclick = () => setTriggerValue("open", c.idx);
    card.append(text, b); cards.push(card);
  }
  grid.replaceChildren(...cards);
}
