// The live request feed: the newest rows first (the audit log's last page, then the WebSocket's
// rows as they are committed), pausable and filterable.

import { api, signedOut } from "./api.js";
import { el } from "./dom.js";
import * as f from "./format.js";

const KEEP = 500; // rows kept (and shown at most)
const POLICY_VIOLATION = 1008;

const rows = []; // newest first
const seen = new Set();
let waiting = []; // rows that arrived while paused, oldest first
let paused = false;
let socket = null;
let retry = 0;
let retryTimer = null;
let running = false;

const body = () => document.querySelector("#feed tbody");
const filterInput = () => document.getElementById("feed-filter");
const statusSelect = () => document.getElementById("feed-status");
const stateLine = () => document.getElementById("feed-state");
const pauseButton = () => document.getElementById("feed-pause");

export function setupLive() {
  pauseButton().addEventListener("click", togglePause);
  filterInput().addEventListener("input", render);
  statusSelect().addEventListener("change", render);
}

export async function startLive() {
  running = true;
  connect();
  try {
    const recent = await api("/admin/ui/api/recent?limit=100");
    add(recent.slice().reverse());
  } catch (error) {
    stateLine().textContent = `Could not read the audit log: ${error.message}`;
  }
}

export function stopLive() {
  running = false;
  clearTimeout(retryTimer);
  if (socket) socket.close();
  socket = null;
  rows.length = 0;
  seen.clear();
  waiting = [];
  render();
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/admin/audit/feed`);
  socket.addEventListener("open", () => {
    retry = 0;
    showState();
  });
  socket.addEventListener("message", (event) => add([JSON.parse(event.data)]));
  socket.addEventListener("close", (event) => {
    socket = null;
    if (!running) return;
    if (event.code === POLICY_VIOLATION) {
      signedOut();
      return;
    }
    retry = Math.min(retry + 1, 6);
    stateLine().textContent = "Disconnected; reconnecting…";
    retryTimer = setTimeout(connect, 500 * 2 ** retry);
  });
}

function add(incoming) {
  // `incoming` is oldest first; a row may come from both the first page and the socket.
  const fresh = incoming.filter((row) => !seen.has(row.id));
  for (const row of fresh) seen.add(row.id);
  if (!fresh.length) return;
  if (paused) {
    waiting.push(...fresh);
    if (waiting.length > KEEP) waiting = waiting.slice(-KEEP);
    showState();
    return;
  }
  rows.unshift(...fresh.reverse());
  trim();
  render();
}

function trim() {
  while (rows.length > KEEP) seen.delete(rows.pop().id);
}

function togglePause() {
  paused = !paused;
  pauseButton().setAttribute("aria-pressed", String(paused));
  pauseButton().textContent = paused ? "Resume" : "Pause";
  if (!paused && waiting.length) {
    rows.unshift(...waiting.reverse());
    waiting = [];
    trim();
    render();
  }
  showState();
}

function showState() {
  const live = socket && socket.readyState === WebSocket.OPEN;
  const parts = [paused ? "Paused" : live ? "Live" : "Connecting…"];
  if (paused && waiting.length) parts.push(`${waiting.length} new while paused`);
  stateLine().textContent = parts.join(" · ");
}

function matches(row, text, status) {
  if (status && row.status !== status) return false;
  if (!text) return true;
  return [row.model, row.api_key, row.endpoint, row.status, row.error_type, row.request_id]
    .some((field) => field && String(field).toLowerCase().includes(text));
}

function render() {
  const text = filterInput().value.trim().toLowerCase();
  const status = statusSelect().value;
  const shown = rows.filter((row) => matches(row, text, status));
  body().replaceChildren(...shown.map(rowElement));
  document.getElementById("feed-empty").hidden = shown.length > 0;
  document.getElementById("feed-empty").textContent = rows.length ? "No request matches the filter." : "No request yet.";
}

function rowElement(row) {
  const status = row.error_type ? `${row.status} (${row.error_type})` : row.status;
  return el(
    "tr",
    { "data-request-id": row.request_id },
    el("td", { class: "mono", text: f.clock(row.timestamp), title: row.timestamp }),
    el("td", { class: "wrap", text: row.endpoint }),
    el("td", { class: "wrap", text: row.model ?? "–" }),
    el("td", { text: row.api_key ?? "–" }),
    el("td", { class: `status-${row.status}`, text: status + (row.http_status ? ` · ${row.http_status}` : "") }),
    el("td", { class: "num", text: f.ms(row.duration_ms) }),
    el("td", { class: "num", text: `${f.count(row.prompt_tokens)} / ${f.count(row.completion_tokens)}` }),
    el("td", { class: "num", text: f.ms(row.time_to_first_token_ms) }),
  );
}
