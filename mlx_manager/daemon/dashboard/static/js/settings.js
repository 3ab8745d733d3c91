// Settings with their origin; the live-applicable ones can be changed here (as `config set` does,
// with its validation and its messages), the others say how to change them.

import { api } from "./api.js";
import { el } from "./dom.js";
import * as f from "./format.js";

// Timeouts first: they are what people come to change.
const ORDER = ["timeouts", "models", "server", "cache", "log", "audit", "auth", "telemetry", "supervisor"];

export async function refreshSettings() {
  const error = document.getElementById("settings-error");
  let view;
  try {
    view = await api("/admin/ui/api/settings");
  } catch (problem) {
    error.textContent = problem.message;
    return;
  }
  error.textContent = view.error ?? "";
  document.getElementById("settings-intro").textContent = view.can_edit
    ? `Changes are written to ${view.path} and applied at once, as \`mlx-manager config set\` does.`
    : "Signed in with an API key: settings are read-only here. Run `mlx-manager dashboard` on the daemon's machine to change them.";
  render(view.keys, view.can_edit);
}

function render(keys, canEdit) {
  const sections = new Map();
  for (const item of keys) {
    const section = item.key.split(".")[0];
    if (!sections.has(section)) sections.set(section, []);
    sections.get(section).push(item);
  }
  const names = [...sections.keys()].sort((a, b) => rank(a) - rank(b));
  document.getElementById("settings-sections").replaceChildren(
    ...names.map((name) =>
      el("section", { class: "settings-section", "aria-labelledby": `settings-${name}` },
        el("h2", { id: `settings-${name}`, text: `[${name}]` }),
        el("div", { class: "table-wrap" },
          el("table", { class: "data" },
            el("thead", {}, el("tr", {}, ...["Key", "Value", "Origin", "What it does"].map((label) => el("th", { scope: "col", text: label })))),
            el("tbody", {}, ...sections.get(name).map((item) => row(item, canEdit))))))),
  );
}

function rank(section) {
  const at = ORDER.indexOf(section);
  return at < 0 ? ORDER.length : at;
}

function row(item, canEdit) {
  const id = `setting-${item.key.replace(".", "-")}`;
  const help = el("span", { id: `${id}-help`, class: "muted", text: ` Expected: ${item.expected}.` });
  const message = el("p", { id: `${id}-message`, class: "setting-message", role: "status" });
  return el("tr", { id },
    el("td", {}, el("code", { text: item.key })),
    el("td", { class: "wrap" }, item.editable && canEdit ? form(item, id, message) : shown(item), message),
    el("td", {}, el("span", { class: `origin origin-${item.origin}`, text: item.origin === "env" ? `env ${item.env_var}` : item.origin })),
    el("td", { class: "wrap" }, item.description, help,
      item.restart ? el("span", { class: "note", text: " Takes effect at the next start." }) : null),
  );
}

function shown(item) {
  const text = f.value(item.value) || '""';
  const running = f.value(item.running);
  return el("span", {}, el("code", { text }),
    running !== f.value(item.value) ? el("span", { class: "note", text: ` (running: ${running || '""'})` }) : null);
}

function form(item, id, message) {
  const inputId = `${id}-input`;
  const input = item.choices.length
    ? el("select", { id: inputId, name: "value", "aria-describedby": `${id}-help ${id}-message` },
        ...item.choices.map((choice) => el("option", { value: choice, selected: f.value(item.value) === choice, text: choice })))
    : el("input", { id: inputId, name: "value", type: "text", value: f.value(item.value), spellcheck: "false", autocomplete: "off",
        "aria-describedby": `${id}-help ${id}-message` });
  const node = el("form", { class: "setting-form" },
    el("label", { for: inputId, class: "visually-hidden", text: `New value of ${item.key}` }),
    input,
    el("button", { type: "submit", text: "Save" }));
  node.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.className = "setting-message";
    message.textContent = "Saving…";
    try {
      const answer = await api("/admin/ui/api/settings", { method: "POST", body: { key: item.key, value: input.value } });
      message.textContent = `Saved ${item.key} = ${f.value(answer.value)}${answer.applied ? "; the daemon applied it" : ""}.`;
      if (answer.note) message.textContent += ` Note: ${answer.note}.`;
      input.value = f.value(answer.value);
    } catch (error) {
      message.className = "setting-message error";
      message.setAttribute("role", "alert");
      message.textContent = error.message;
    }
  });
  return node;
}
