// The dashboard: sign-in, the four pages (chosen by the URL's #fragment), and what each refreshes
// while it is shown.

import { api, ApiError, onSignedOut, setSession } from "./api.js";
import { refreshCharts, setupCharts } from "./charts.js";
import { setupLive, startLive, stopLive } from "./live.js";
import { refreshSettings } from "./settings.js";
import { refreshState } from "./state.js";

const PAGES = {
  live: { refresh: null, every: 0 },
  charts: { refresh: refreshCharts, every: 10000 },
  state: { refresh: refreshState, every: 2000 },
  settings: { refresh: refreshSettings, every: 0 },
};

let timer = null;
let signedIn = false;

const $ = (id) => document.getElementById(id);

async function boot() {
  setupLive();
  setupCharts(() => refreshCharts());
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", onLogout);
  window.addEventListener("hashchange", () => show(false));
  onSignedOut(toLogin);

  // `mlx-manager dashboard` opens /admin#login=TOKEN: the token never reaches a server log, and
  // leaves the address bar (and the history) before it is used.
  const link = new URLSearchParams(location.hash.slice(1)).get("login");
  if (link) history.replaceState(null, "", "/admin#live");
  try {
    const info = link
      ? await api("/admin/ui/api/login", { method: "POST", body: { link } })
      : await api("/admin/ui/api/session");
    signIn(info);
  } catch (error) {
    toLogin(error instanceof ApiError && link ? error.message : "");
  }
}

function signIn(info) {
  const fromForm = $("login").contains(document.activeElement);
  setSession(info);
  signedIn = true;
  $("booting").hidden = true;
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = info.role === "admin" ? "Signed in as admin" : `Signed in with key ${info.name}`;
  startLive();
  // When the sign-in form (now hidden) had the focus, it moves to the page shown.
  show(!fromForm);
}

function toLogin(message = "") {
  signedIn = false;
  setSession(null);
  clearInterval(timer);
  stopLive();
  $("booting").hidden = true;
  $("tabs").hidden = true;
  $("who").hidden = true;
  for (const id of Object.keys(PAGES)) $(id).hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-key").focus();
}

function current() {
  const name = location.hash.slice(1);
  return name in PAGES ? name : "live";
}

function show(first) {
  if (!signedIn) return;
  const name = current();
  for (const id of Object.keys(PAGES)) $(id).hidden = id !== name;
  for (const link of document.querySelectorAll("#tabs a")) {
    if (link.getAttribute("href") === `#${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!first) $(`${name}-title`).focus(); // keyboard and screen-reader users land on the new page
  clearInterval(timer);
  const page = PAGES[name];
  if (page.refresh) {
    page.refresh();
    if (page.every) timer = setInterval(page.refresh, page.every);
  }
}

async function onLogin(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    signIn(await api("/admin/ui/api/login", { method: "POST", body: { key: $("login-key").value } }));
    $("login-key").value = "";
  } catch (error) {
    $("login-error").textContent = error.message;
  }
}

async function onLogout() {
  try {
    await api("/admin/ui/api/logout", { method: "POST" });
  } finally {
    toLogin("Signed out.");
  }
}

boot();
