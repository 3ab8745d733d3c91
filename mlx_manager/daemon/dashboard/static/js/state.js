// What the daemon is doing now: itself, the loaded models (with an Unload button each), the
// prompt cache, and the figures since it started.

import { api } from "./api.js";
import { el, facts, table } from "./dom.js";
import * as f from "./format.js";

const message = () => document.getElementById("unload-message");

export async function refreshState() {
  let state;
  try {
    state = await api("/admin/ui/api/state");
  } catch (error) {
    message().textContent = `Could not read the daemon's state: ${error.message}`;
    return;
  }
  document.getElementById("version").textContent = state.version;
  const exit = state.last_exit;
  facts(document.getElementById("daemon-facts"), [
    ["Version", state.version],
    ["Uptime", f.seconds(state.uptime_seconds)],
    ["Process", `pid ${state.pid}`],
    ["Restarts", state.supervised ? f.count(state.restarts) : "not supervised"],
    ...(exit ? [["Last exit", `${exit.reason ?? "?"} (${exit.at ?? ""})`]] : []),
    ["BLAS", state.blas],
    ["Queue depth", f.count(state.queue_depth)],
    ["Active jobs", f.count(state.active_jobs)],
    ["Requests in flight", f.count(state.in_flight)],
    ["Loading", state.loading ?? "nothing"],
    ["Keep-alive", state.keep_alive_seconds ? f.seconds(state.keep_alive_seconds) : "forever"],
    ["Audit rows waiting", f.count(state.audit.backlog)],
    ["Audit rows dropped", f.count(state.audit.dropped)],
    ...(state.draining ? [["Draining", "yes: taking no new requests"]] : []),
  ]);
  models(state.models);
  cache(state.models);
  const s = state.since_start;
  facts(document.getElementById("since-start"), [
    ["Requests", f.count(s.requests)],
    ...Object.entries(s.requests_by_status).map(([status, n]) => [`Requests: ${status}`, f.count(n)]),
    ["Tokens in / out", `${f.count(s.prompt_tokens)} / ${f.count(s.completion_tokens)}`],
    ["Mean duration", s.request_duration_seconds_mean === null ? "–" : f.ms(s.request_duration_seconds_mean * 1000)],
    ["Mean TTFT", s.time_to_first_token_seconds_mean === null ? "–" : f.ms(s.time_to_first_token_seconds_mean * 1000)],
  ]);
}

function models(items) {
  document.getElementById("models-empty").hidden = items.length > 0;
  document.getElementById("models").hidden = items.length === 0;
  table(document.getElementById("models"), [
    { label: "Model", wrap: true, cell: (m) => m.id },
    { label: "Kind", cell: (m) => m.kind },
    { label: "Memory", num: true, cell: (m) => f.bytes(m.memory_bytes) },
    { label: "Active", num: true, cell: (m) => f.count(m.active_jobs) },
    { label: "Queued", num: true, cell: (m) => f.count(m.queued_jobs) },
    { label: "Idle", num: true, cell: (m) => f.seconds(m.idle_seconds) },
    { label: "Unloads in", num: true, cell: (m) => (m.expires_in_seconds === null ? (m.keep_alive_seconds ? "busy" : "never") : f.seconds(m.expires_in_seconds)) },
    { label: "", cell: (m) => el("button", { type: "button", class: "danger", "aria-label": `Unload ${m.id}`, text: "Unload", onclick: () => unload(m.id, false) }) },
  ], items, "Loaded models");
}

function cache(items) {
  document.getElementById("cache-empty").hidden = items.length > 0;
  document.getElementById("cache").hidden = items.length === 0;
  table(document.getElementById("cache"), [
    { label: "Model", wrap: true, cell: (m) => m.id },
    { label: "Hit rate", num: true, cell: (m) => f.percent(m.cache.hit_rate) },
    { label: "Hits / misses", num: true, cell: (m) => `${f.count(m.cache.hits)} / ${f.count(m.cache.misses)}` },
    { label: "Tokens reused", num: true, cell: (m) => f.count(m.cache.cached_tokens) },
    { label: "Entries", num: true, cell: (m) => f.count(m.cache.entries) },
    { label: "Memory", num: true, cell: (m) => f.bytes(m.cache.bytes) },
    { label: "On disk", num: true, cell: (m) => `${f.count(m.cache.disk_entries)} · ${f.bytes(m.cache.disk_bytes)}` },
  ], items, "Prompt cache per model");
}

async function unload(model, force) {
  message().replaceChildren(document.createTextNode(`Unloading ${model}…`));
  try {
    await api("/admin/ui/api/models/unload", { method: "POST", body: { model, force } });
    message().textContent = `Unloaded ${model}.`;
  } catch (error) {
    message().replaceChildren(document.createTextNode(`${error.message} `));
    if (error.kind === "model_busy") {
      message().append(el("button", { type: "button", class: "danger", text: "End its jobs and unload", onclick: () => unload(model, true) }));
    }
  }
  await refreshState();
}
