// Calls to the daemon: the session's CSRF token on every change, problem documents as ApiErrors.

const session = { csrf: null };
const signedOutListeners = [];

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `the daemon answered ${status}`);
    this.status = status;
    this.kind = problem?.error?.code ?? null;
  }
}

export function setSession(info) {
  session.csrf = info ? info.csrf_token : null;
}

export function onSignedOut(listener) {
  signedOutListeners.push(listener);
}

export function signedOut() {
  session.csrf = null;
  for (const listener of signedOutListeners) listener();
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (session.csrf) headers["X-CSRF-Token"] = session.csrf;
  }
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (response.status === 204) return null;
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, answer);
    // The session ended (expired, revoked key, daemon restarted): back to the sign-in form.
    if (response.status === 401 && !path.endsWith("/login")) signedOut();
    throw error;
  }
  return answer;
}
