// Small DOM helpers: every text goes in as text, never as markup.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, val] of Object.entries(attributes)) {
    if (val === null || val === undefined || val === false) continue;
    if (name === "class") node.className = val;
    else if (name === "text") node.textContent = val;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), val);
    else node.setAttribute(name, val === true ? "" : val);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function table(node, columns, rows, caption) {
  // columns: [{ label, cell: row => text or Node, num: bool }]
  const head = el("tr", {}, ...columns.map((c) => el("th", { scope: "col", class: c.num ? "num" : null, text: c.label })));
  const body = rows.map((row) =>
    el("tr", {}, ...columns.map((c) => {
      const content = c.cell(row);
      const cell = el("td", { class: c.num ? "num" : c.wrap ? "wrap" : null });
      cell.append(content instanceof Node ? content : document.createTextNode(content ?? ""));
      return cell;
    })),
  );
  node.replaceChildren(
    ...(caption ? [el("caption", { class: "visually-hidden", text: caption })] : []),
    el("thead", {}, head),
    el("tbody", {}, ...body),
  );
}

export function facts(node, items) {
  node.replaceChildren(...items.map(([term, detail]) => el("div", {}, el("dt", { text: term }), el("dd", { text: detail }))));
}
